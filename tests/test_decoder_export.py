"""Decoder adapters survive every export kind: the decoder family, the click decoder, Meta's decoder and
its batched low-res form, and the per-adapter decoders of a shared-trunk export give the masks of the
merged torch model (IoU >= 0.99 on each of 40 prompts), for a decoder-only and an encoder+decoder
adapter with random non-zero weights. The graphs are fed the merged torch model's embedding, so what
is compared is the decoder alone; a base-decoder check shows the adapters matter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_adapted
from peft_export.export import merge_and_export
from peft_export.export.click_decoder import shown_mask_index
from peft_export.export.gates import graph_runner
from peft_export.export.shared_export import merge_and_export_adapters
from peft_export.export.verify import _torch_decode, meta_prompt
from peft_export.models import load_sam
from peft_export.peft import merge_peft

pytestmark = pytest.mark.slow  # each export takes tens of seconds

ADAPTERS = {
    "deconly": dict(method="lora", rank=4, blocks="none", targets=("dec.all",), train_prompt_encoder=False),
    "encdec": dict(method="lora", rank=4, blocks="late", targets=("q", "v", "dec.attn", "dec.hyper", "dec.iou")),
}
IMAGE_SIZE = 256
MIN_IOU = 0.99


def _prompts(s: int, n: int = 40, seed: int = 3) -> list[tuple]:
    """(points, labels, box, previous-mask flag) per prompt: single clicks, click pairs, boxes, box + click;
    every fifth one also feeds the previous prompt's mask back."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        kind = i % 4
        pts = torch.rand(1, 1 + (kind == 1), 2, generator=g) * s
        labels = torch.tensor([[1, 0]]) if kind == 1 else torch.tensor([[1]])
        lo = torch.rand(2, generator=g) * 0.5 * s
        box = torch.cat([lo, lo + (0.2 + torch.rand(2, generator=g) * 0.4) * s]).view(1, 4)
        out.append((pts if kind != 2 else None, labels if kind != 2 else None, box if kind >= 2 else None, i % 5 == 4))
    return out


@torch.no_grad()
def _reference(merged, emb: torch.Tensor) -> list[dict]:
    """The merged torch model's four low-res masks per prompt, with the Meta-layout graph inputs."""
    refs, previous = [], None
    for points, labels, box, feed_back in _prompts(merged.image_encoder.img_size):
        mask = previous if feed_back else None
        low, iou = _torch_decode(merged, emb, points, labels, box, mask)
        coords, labs = meta_prompt(points, labels, box)
        refs.append({"coords": coords, "labels": labs, "mask": mask, "low": low, "iou": iou})
        previous = low[:, :1]
    return refs


def _iou(ref: torch.Tensor, got: np.ndarray) -> float:
    a, b = ref.numpy() > 0, np.asarray(got) > 0
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def _feeds(ref: dict, g4: int) -> dict:
    has = ref["mask"] is not None
    return {"point_coords": ref["coords"], "point_labels": ref["labels"],
            "mask_input": ref["mask"].numpy() if has else np.zeros((1, 1, g4, g4), np.float32),
            "has_mask_input": np.full(1, float(has), np.float32)}


def _graph_ious(files: dict[str, str], emb: torch.Tensor, refs: list[dict]) -> dict[str, list[float]]:
    """Per decoder kind present in ``files``, the mask IoU of every prompt against the reference."""
    g4 = refs[0]["low"].shape[-1]
    out: dict[str, list[float]] = {}
    context = graph_runner(files["split_image"])({"image_embeddings": emb.numpy()})
    prompts, masks = graph_runner(files["split_prompts"]), graph_runner(files["split_masks"])
    out["family"] = []
    for r in refs:
        o = prompts({**context, **_feeds(r, g4)})
        low = masks({"keys": o["keys"], "mask_weights": o["mask_weights"]})["low_res_masks"]
        out["family"].append(_iou(r["low"], low))
    click = graph_runner(files["click_decoder"])
    out["click_decoder"] = []
    for r in refs:
        o = click({**context, **_feeds(r, g4)})
        shown = shown_mask_index(r["iou"], torch.from_numpy(r["labels"]))
        assert np.array_equal(o["mask_index"], shown.numpy())
        out["click_decoder"].append(_iou(r["low"][torch.arange(1), shown].unsqueeze(1), o["low_res_masks"]))
    for flavour in ("decoder", "decoder_lowres"):
        if flavour not in files:
            continue
        run = graph_runner(files[flavour])
        extra = {"orig_im_size": np.array([IMAGE_SIZE, IMAGE_SIZE], np.float32)} if flavour == "decoder" else {}
        out[flavour] = [_iou(r["low"], run({"image_embeddings": emb.numpy(), **_feeds(r, g4), **extra})["low_res_masks"])
                        for r in refs]
    return out


@pytest.fixture(scope="module")
def adapters():
    return {name: make_adapted(cfg) for name, cfg in ADAPTERS.items()}  # one base (seed 0), as a shared export needs


def _check(ious: dict[str, list[float]], kinds: set[str]) -> None:
    assert set(ious) == kinds
    for kind, values in ious.items():
        assert len(values) >= 32
        assert min(values) >= MIN_IOU, (kind, min(values))


def _embedding(merged) -> torch.Tensor:
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return merged.image_encoder(image)


def test_single_export_decoders_carry_the_merged_decoder(tmp_path, adapters):
    """The encoder+decoder adapter alone (its decoder-only sibling goes through the same graphs in the
    shared-trunk export below, which also has Meta's decoder)."""
    adapted = adapters["encdec"]
    manifest = merge_and_export(adapted, tmp_path / "export", precisions=("fp32",), progress=False, meta_decoder=True)
    merged = merge_peft(adapted.model)
    emb = _embedding(merged)
    refs = _reference(merged, emb)
    files = {g: str(tmp_path / "export" / e["fp32"]["path"]) for g, e in manifest["graphs"].items()}
    _check(_graph_ious(files, emb, refs), {"family", "click_decoder", "decoder", "decoder_lowres"})
    # The base decoder does not give these masks: the test would notice an export that dropped the adapter.
    base, _ = load_sam("tiny", warn_random=False)
    base_refs = _reference(base.eval(), emb)
    assert np.mean([_iou(b["low"], r["low"].numpy()) for b, r in zip(base_refs, refs)]) < 0.95


def test_shared_trunk_export_gives_each_adapter_its_merged_decoder(tmp_path, adapters):
    manifest = merge_and_export_adapters(adapters, tmp_path / "shared", precisions=("fp32",), progress=False,
                                         meta_decoder=True)
    graphs = manifest["graphs"]
    for name, adapted in adapters.items():
        merged = merge_peft(adapted.model)
        emb = _embedding(merged)
        entry = manifest["adapters"][name]
        files = {g: str(tmp_path / "shared" / graphs[entry[g]]["fp32"]["path"])
                 for g in ("split_image", "split_prompts", "split_masks", "click_decoder", "decoder")}
        _check(_graph_ious(files, emb, _reference(merged, emb)), {"family", "click_decoder", "decoder"})
