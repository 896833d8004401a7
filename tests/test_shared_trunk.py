"""One trunk, many adapters: export (split, bit-identical trunk, parity), runtime (lazy heads, threads,
adapter=), CLI (merge-and-export, predict, bad input), evaluate specs, bench and the serving example.

Adapters on one tiny base (random init, seed 0), each with its own random non-zero weights:
late LoRA (blocks 2-3), two decoder-only adapters (freeze-encoder), SSF (trains the patch
embedding: its own encoder) and LoRA on block 0 (nothing worth sharing: refused with --shared-trunk).
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import randomize_trainables
from peft_export.cli.main import app
from peft_export.errors import PeftExportError
from peft_export.export import merge_and_export_adapters, read_manifest
from peft_export.export.agreement import GATES, mask_agreement
from peft_export.export.sharing import first_difference, head_state, prove_trunk, state_digest, trunk_state
from peft_export.fsutil import sha256_file
from peft_export.models import load_sam
from peft_export.peft import PeftConfig, merge_peft
from peft_export.peft.adapters import build_adapted_model, load_adapter, save_adapter
from peft_export.runtime import EncodedImage, SamSession

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "late": dict(method="lora", rank=4, targets=("q", "k", "v", "mlp"), blocks="late"),
    "dec": dict(method="freeze-encoder"),
    "dec2": dict(method="freeze-encoder"),
    "stem": dict(method="ssf", blocks="all"),  # ssf_patch_embed: the patch embedding trains
    "early": dict(method="lora", rank=4, targets=("q", "v"), blocks="0"),
}
BOXES = np.asarray([[30, 40, 150, 160], [10, 10, 90, 70], [100, 20, 190, 120]], float)


def make_run(root: Path, name: str, base_seed: int = 0, weights_seed: int | None = None) -> Path:
    """An adapter run on the tiny random base ``base_seed``, random non-zero weights, decoder masks scaled
    so that random decoders give masks of some size."""
    adapted = build_adapted_model(PeftConfig(**CONFIGS[name]), "tiny", None, None, seed=base_seed)
    randomize_trainables(adapted.model, seed=weights_seed if weights_seed is not None else 10 + len(name) * 7 + ord(name[0]))
    with torch.no_grad():
        for mlp in adapted.model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
            mlp.layers[-1].bias.mul_(30.0)
    return save_adapter(adapted, root / name)


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {name: make_run(root, name) for name in CONFIGS}
    out["other-base"] = make_run(root / "other", "late", base_seed=1)
    return out


@pytest.fixture(scope="module")
def multi(runs, tmp_path_factory) -> Path:
    """The CLI export of four adapters: late + dec + dec2 share a trunk, stem gets its own encoder."""
    out = tmp_path_factory.mktemp("multi") / "export"
    res = cli("merge-and-export", "--adapter", f"late={runs['late']}", "--adapter", f"dec={runs['dec']}",
              "--adapter", f"dec2={runs['dec2']}", "--adapter", f"stem={runs['stem']}",
              "--precision", "fp32,int8", "--out", out)
    assert res.exit_code == 0, res.output
    assert "adapters late, dec, dec2 share trunk.onnx (patch_embed, pos_embed, blocks 0-1)" in res.output
    assert "adapter stem gets its own encoder: it (ssf) changes the patch or positional embedding" in res.output
    return out


@pytest.fixture(scope="module")
def single(runs, tmp_path_factory) -> Path:
    """``--adapter RUN`` alone: today's one-model export."""
    out = tmp_path_factory.mktemp("single") / "export"
    res = cli("merge-and-export", "--adapter", runs["late"], "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(3)
    low = rng.uniform(0, 255, size=(7, 10, 3))
    img = np.kron(low, np.ones((32, 32, 1)))[:200, :300]
    return np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


# ---- export -------------------------------------------------------------------------------------


def test_manifest_lists_adapters_split_and_what_each_graph_holds(multi):
    m = read_manifest(multi)
    assert m["format_version"] == 2 and list(m["adapters"]) == ["late", "dec", "dec2", "stem"]
    trunk = m["shared_trunk"]
    assert trunk["split_block"] == 2 and trunk["adapters"] == ["late", "dec", "dec2"]
    assert trunk["holds"] == "patch_embed, pos_embed, blocks 0-1" and trunk["proof"]["identical"]
    a = m["adapters"]
    assert a["late"]["encoder"] == ["trunk", "head_late"] and a["late"]["first_trainable_block"] == 2
    # Decoder-only adapters share the whole encoder: one head, the base's.
    assert a["dec"]["encoder"] == a["dec2"]["encoder"] == ["trunk", "head_base"]
    assert a["dec"]["holds"]["head_base"] == "blocks 2-3, neck"
    assert a["stem"]["encoder"] == ["encoder_stem"] and "patch" in a["stem"]["own_encoder_because"]
    assert a["late"]["peft"]["method"] == "lora" and a["late"]["merged"] is True
    src = a["late"]["source"]
    assert src["kind"] == "adapter" and Path(src["adapter"]).is_absolute()
    assert src["adapter_sha256"] == sha256_file(Path(src["adapter"]) / "adapter.safetensors")
    from peft_export.export.pipeline import decoder_flavours

    assert decoder_flavours(False, False) == ()
    for name in a:  # the decoder family per adapter; Meta's graphs only with --meta-decoder
        assert {f for f in ("decoder", "decoder_lowres") if f in a[name]} == set(decoder_flavours(False, False))
        assert all(a[name][f] == f"{f}_{name}" for f in decoder_flavours(False, False))
        assert a[name]["split_prompts"] == f"split_prompts_{name}" and a[name]["split_masks"] == f"split_masks_{name}"
        # the browser page's pair, verified as a chain against this adapter's decoder
        assert a[name]["split_image"] == f"split_image_{name}" and a[name]["click_decoder"] == f"click_decoder_{name}"
        # what each click decoder computes is measured against the merged torch model, not read back from
        # the manifest: test_decoder_export.py::test_shared_trunk_export_gives_each_adapter_its_merged_decoder
        assert f"click_decoder_{name}" in m["graphs"]
        assert set(a[name]["encoder_parity"]) == {"fp32", "int8"}  # what each graph computes: the tests below
    assert set(m["graphs"]["head_base"]["fp32"]["adapters"]) == {"dec", "dec2"}
    assert m["graphs"]["trunk"]["fp32"]["outputs"][0] == {"name": "trunk_features", "shape": [1, 16, 16, 64],
                                                          "dtype": "float32"}
    listed = {"manifest.json"}
    for graph, variants in m["graphs"].items():
        for entry in variants.values():
            for f in entry["files"]:
                assert f["sha256"] == sha256_file(multi / f["path"])
                listed.add(f["path"])
    assert listed == {p.name for p in multi.iterdir()}
    assert not (multi / "head_dec.onnx").exists() and not (multi / "encoder.onnx").exists()


def test_single_adapter_keeps_todays_layout(single):
    m = read_manifest(single)
    assert m["format_version"] == 1 and "adapters" not in m and "shared_trunk" not in m
    from peft_export.export.pipeline import decoder_flavours

    assert set(m["graphs"]) == {"encoder", "split_image", "split_prompts", "split_masks", "click_decoder",
                                *decoder_flavours(False, False)}
    s = SamSession(single)
    assert s.adapters == ()
    with pytest.raises(PeftExportError, match="holds one model, not named adapters"):
        SamSession(single).predict(box=BOXES[0], adapter="late", embedding=s.encode(np.zeros((64, 64), np.uint8)))


def test_each_adapters_encoder_graphs_compute_its_merged_encoder(multi, runs):
    """Recomputed here, not read from the manifest's verdict: trunk -> head (or the adapter's own
    encoder) in fp32 equals the merged torch encoder, and in int8 decodes the masks the fp32 one does
    within the export's int8 gate (mean / min mask IoU over the gate's 32 prompts)."""
    from peft_export.export.verify import graph_runner
    from peft_export.merge import probe_inputs

    m = read_manifest(multi)
    image, _ = probe_inputs(256, seed=5)
    for name in ("late", "dec", "dec2", "stem"):
        merged = merge_peft(load_adapter(runs[name]).model).eval()
        with torch.no_grad():
            want = merged.image_encoder(image)
        for p in ("fp32", "int8"):
            chain = [multi / m["graphs"][key][p]["path"] for key in m["adapters"][name]["encoder"]]
            x = graph_runner(chain[0])({"image": image.numpy()})
            emb = graph_runner(chain[1])({"trunk_features": x["trunk_features"]}) if len(chain) == 2 else x
            emb = emb["image_embeddings"]
            if p == "fp32":
                rel = np.abs(emb - want.numpy()).max() / np.abs(want.numpy()).max()
                assert rel < 1e-4, (name, rel)
            else:
                gate = mask_agreement(merged, want, emb, GATES["int8"]["prompts"])
                assert gate["mask_iou_mean"] >= GATES["int8"]["mask_iou_mean"], (name, gate["mask_iou_mean"])
                assert gate["mask_iou_min"] >= GATES["int8"]["mask_iou_min"], (name, gate["mask_iou_min"])


def test_trunk_weights_bit_identical_to_base_and_every_adapter(multi, runs):
    import onnx
    from onnx import numpy_helper

    base, _ = load_sam("tiny", None, None, seed=0, warn_random=False)
    ref = trunk_state(base, 2)
    m = read_manifest(multi)
    assert m["shared_trunk"]["proof"]["sha256"] == state_digest(ref)
    assert m["shared_trunk"]["proof"]["tensors"] == len(ref)
    for name in ("late", "dec", "dec2"):
        merged = merge_peft(load_adapter(runs[name]).model)
        assert first_difference(ref, trunk_state(merged, 2)) is None, name
    # The late adapter's head is not the base's; the decoder-only ones' is.
    late = merge_peft(load_adapter(runs["late"]).model)
    assert first_difference(head_state(base, 2), head_state(late, 2)) is not None
    assert state_digest(head_state(base, 2)) == state_digest(head_state(merge_peft(load_adapter(runs["dec"]).model), 2))
    # The graph itself holds the base's weights: every named initializer of trunk.onnx equals its tensor.
    graph = onnx.load(str(multi / "trunk.onnx"))
    named = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    found = [k for k in ref if k in named]
    assert "image_encoder.patch_embed.proj.weight" in found and "image_encoder.pos_embed" in found
    for k in found:
        assert named[k].tobytes() == ref[k].numpy().tobytes(), k
    assert not any(k.startswith(("image_encoder.blocks.2.", "image_encoder.blocks.3.", "image_encoder.neck"))
                   for k in named)


def test_the_proof_catches_one_flipped_bit():
    base, _ = load_sam("tiny", None, None, seed=0, warn_random=False)
    ref = trunk_state(base, 2)
    other = {k: v.clone() for k, v in ref.items()}
    w = other["image_encoder.blocks.1.attn.qkv.weight"]
    w.view(torch.int32)[0, 0] ^= 1  # the last mantissa bit of one weight
    with pytest.raises(PeftExportError, match=r"blocks\.1\.attn\.qkv\.weight differs"):
        prove_trunk(ref, other, "x", "the base")


# ---- runtime --------------------------------------------------------------------------------------


def test_each_adapter_matches_its_unmerged_torch_model(multi, runs, image):
    from peft_export.evaluation.specs import TorchPredictor

    session = SamSession(multi)
    session.set_image(image)
    for name in ("late", "dec", "dec2", "stem"):
        adapted = load_adapter(runs[name])
        torch_pred = TorchPredictor(adapted.model, adapted.intensity)
        torch_pred.set_image(image)
        for box in BOXES:
            want, want_iou, _ = torch_pred.predict(box=box, multimask_output=True)
            got, got_iou, _ = session.predict(box=box, multimask_output=True, adapter=name)
            assert _iou(want, got) >= 0.999, name
            np.testing.assert_allclose(got_iou, want_iou, atol=1e-4)
    # Each adapter's masks are its own: the decoder-only adapters differ from each other.
    a = session.predict(box=BOXES[0], adapter="dec")[2]
    b = session.predict(box=BOXES[0], adapter="dec2")[2]
    assert np.abs(a - b).max() > 1e-2


def test_masks_identical_to_the_adapters_own_export(multi, single, runs, image):
    shared, own = SamSession(multi, adapters=["late"]), SamSession(single)
    got = shared.predict_batch(boxes=BOXES, embedding=shared.encode(image))
    want = own.predict_batch(boxes=BOXES, embedding=own.encode(image))
    for i in range(len(BOXES)):
        assert _iou(got[0][i, 0], want[0][i, 0]) >= 0.999
    np.testing.assert_allclose(got[2], want[2], rtol=0, atol=1e-3)
    shared8 = SamSession(multi, precision="int8", adapters=["late"])
    assert shared8.describe()["graphs"]["trunk"]["precision"] == "int8"
    m8 = shared8.predict_batch(boxes=BOXES, embedding=shared8.encode(image))[0]
    # The export's int8 gate, measured here on this image: the 32 gate prompts decoded (torch decoder)
    # from the shared int8 trunk + head embedding vs the adapter's own fp32 export: mean 0.99, min 0.97.
    shared8.set_image(image)
    own.set_image(image)
    merged = merge_peft(load_adapter(runs["late"]).model).eval()
    gate = mask_agreement(merged, torch.from_numpy(own.get_image_embedding().copy()),
                          shared8.get_image_embedding(), GATES["int8"]["prompts"])
    assert gate["mask_iou_mean"] >= GATES["int8"]["mask_iou_mean"], gate["mask_iou_mean"]
    assert gate["mask_iou_min"] >= GATES["int8"]["mask_iou_min"], gate["mask_iou_min"]
    # And the runtime's box masks: non-empty, and on average as close as the gate's per-prompt floor
    # (these masks cover 2-5 % of the image, where one boundary pixel row moves IoU by about 1 %).
    ious = [_iou(m8[i, 0], want[0][i, 0]) for i in range(len(BOXES))]
    assert all(want[0][i, 0].any() and m8[i, 0].any() for i in range(len(BOXES)))
    assert np.mean(ious) >= GATES["int8"]["mask_iou_min"], ious


def test_fused_attention_in_trunk_and_heads(runs, multi, image, tmp_path):
    """``--attention fused`` for several adapters: trunk, heads and own encoders carry ONNX Runtime's
    fused attention op (no N x N scores held), and every adapter's masks equal the plain export's."""
    import onnx

    out = tmp_path / "fused"
    res = cli("merge-and-export", "--adapter", f"late={runs['late']}", "--adapter", f"dec={runs['dec']}",
              "--adapter", f"stem={runs['stem']}", "--precision", "fp32,int8", "--attention", "fused", "--out", out)
    assert res.exit_code == 0, res.output
    m = read_manifest(out)
    for key in ("trunk", "head_late", "head_base", "encoder_stem"):
        for p in ("fp32", "int8"):
            assert m["graphs"][key][p]["attention"] == "fused", (key, p)
            ops = {n.op_type for n in onnx.load(str(out / m["graphs"][key][p]["path"]), load_external_data=False).graph.node}
            assert "MultiHeadAttention" in ops and "Softmax" not in ops, (key, p)
    fused, plain = SamSession(out), SamSession(multi)
    for name in ("late", "dec", "stem"):
        got = fused.predict_batch(boxes=BOXES, embedding=fused.encode(image), adapter=name)
        want = plain.predict_batch(boxes=BOXES, embedding=plain.encode(image), adapter=name)
        for i in range(len(BOXES)):
            assert _iou(got[0][i, 0], want[0][i, 0]) >= 0.999, name
    res = cli("merge-and-export", "--adapter", f"late={runs['late']}", "--adapter", f"dec={runs['dec']}",
              "--calibration-data", tmp_path, "--out", tmp_path / "cal")
    assert res.exit_code != 0 and "--calibration-data applies to single-adapter exports" in res.output
    assert not (tmp_path / "cal").exists()

class Counting:
    """Counts graph runs of a session's backend."""

    def __init__(self, session: SamSession) -> None:
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        inner = session._backend.run

        def run(name, feeds):
            with self.lock:
                self.calls[name] = self.calls.get(name, 0) + 1
            return inner(name, feeds)

        session._backend.run = run


def test_trunk_once_heads_lazily_or_eagerly(multi, image):
    session = SamSession(multi)
    assert session.adapters == ("late", "dec", "dec2", "stem")
    counter = Counting(session)
    session.set_image(image)
    assert counter.calls == {"trunk": 1}
    assert isinstance(session._embedding, EncodedImage) and session._embedding.computed() == ()
    for _ in range(3):
        session.predict(box=BOXES[0], adapter="dec")
    session.predict_batch(boxes=BOXES, adapter="dec2")  # shares dec's head: no new head run
    assert counter.calls["trunk"] == 1 and counter.calls["head_base"] == 1 and "head_late" not in counter.calls
    session.segment_everything(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, adapter="stem")
    assert counter.calls["encoder_stem"] == 1 and counter.calls["trunk"] == 1
    emb = session.get_image_embedding("late")
    assert emb.shape == (1, 256, 16, 16) and not emb.flags.writeable and counter.calls["head_late"] == 1
    session.set_image(image, adapters=["late"])  # eager
    assert counter.calls["trunk"] == 2 and counter.calls["head_late"] == 2
    assert session._embedding.computed() == ("late",)


def test_threads_share_one_session_and_one_encoded_image(multi, image):
    session = SamSession(multi)
    want = {}
    for name in session.adapters:
        ref = SamSession(multi, adapters=[name])
        want[name] = ref.predict(box=BOXES[1], embedding=ref.encode(image))[2]
    counter = Counting(session)
    encoded = session.encode(image)
    other = session.encode(np.flipud(image).copy())
    results, errors = {}, []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            name = session.adapters[i % 4]
            barrier.wait()
            for _ in range(3):
                session.predict(box=BOXES[0], embedding=other, adapter=name)
                results[(i, name)] = session.predict(box=BOXES[1], embedding=encoded, adapter=name)[2]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (i, name), low in results.items():
        np.testing.assert_allclose(low, want[name], atol=1e-5)
    # Each head ran once per image, however many threads asked: 2 images x (2 heads + 1 own encoder).
    assert counter.calls["trunk"] == 2
    assert counter.calls["head_late"] == counter.calls["head_base"] == counter.calls["encoder_stem"] == 2


def test_adapter_argument_rules(multi, image):
    session = SamSession(multi)
    session.set_image(image)
    with pytest.raises(PeftExportError, match="holds adapters late, dec, dec2, stem; pass adapter=NAME"):
        session.predict(box=BOXES[0])
    with pytest.raises(PeftExportError, match="unknown 'nope' \\(this export holds late, dec, dec2, stem\\)"):
        session.predict(box=BOXES[0], adapter="nope")
    with pytest.raises(PeftExportError, match="unknown 'nope'"):
        SamSession(multi, adapters=["nope"])
    with pytest.raises(PeftExportError, match="embedding= is adapter 'late'"):
        emb = session._snapshot(None, "late")
        session.predict(box=BOXES[0], embedding=emb, adapter="dec")
    with pytest.raises(PeftExportError, match="no fp16 file"):
        SamSession(multi, precision="fp16")
    one = SamSession(multi, adapters=["dec"])  # one adapter loaded: adapter= may be left out
    assert one.adapters == ("dec",) and "head_late" not in one.describe()["graphs"]
    np.testing.assert_array_equal(one.predict(box=BOXES[0], embedding=one.encode(image))[2],
                                  session.predict(box=BOXES[0], adapter="dec")[2])


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_refuses_bad_input_naming_the_entry(runs, tmp_path):
    out = tmp_path / "x"
    cases = [
        (("--adapter", f"a={runs['late']}", "--adapter", f"b={runs['other-base']}"),
         "b: base (tiny, image size 256, random init, seed 1) differs from a's base (tiny, image size 256, random init, seed 0)"),
        (("--adapter", f"a={runs['late']}", "--adapter", f"a={runs['dec']}"), "name 'a' is also used by --adapter a="),
        (("--adapter", f"a={runs['late']}", "--adapter", f"b={runs['stem']}", "--shared-trunk"),
         "--shared-trunk: adapter b cannot share a trunk: it (ssf) changes the patch or positional embedding"),
        (("--adapter", f"a={runs['late']}", "--adapter", f"b={runs['early']}", "--shared-trunk"),
         "adapter b cannot share a trunk: it (lora) changes block 0, so only the patch embedding would be shared"),
        (("--adapter", f"a_b={runs['late']}", "--adapter", f"c={runs['dec']}"), "adapter name 'a_b' must be"),
        (("--adapter", f"all={runs['late']}", "--adapter", f"c={runs['dec']}"), "adapter name 'all' is reserved"),
        (("--adapter", f"a={runs['late']}", "--adapter", f"b={tmp_path / 'nope'}"), "nope does not exist"),
        (("--adapter", f"a={runs['late']}", "--adapter", f"b={runs['dec']}", "--format", "onnx,tensorrt"),
         "--format tensorrt: not available for several adapters"),
    ]
    for args, message in cases:
        res = cli("merge-and-export", *args, "--out", out)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (message, res.output)
        assert not out.exists()


def test_cli_micro_sam_entries_carry_their_own_options(runs, tmp_path):
    # A micro-sam training checkpoint ({"model_state": {"sam." + key: ...}}) of the late adapter.
    adapted = load_adapter(runs["late"])
    ckpt = tmp_path / "best.pt"
    torch.save({"model_state": {"sam." + k: v for k, v in adapted.model.state_dict().items()}}, ckpt)
    out = tmp_path / "ms"
    res = cli("merge-and-export", "--micro-sam", f"ms={ckpt};peft=lora;rank=4;blocks=late;targets=q,k,v,mlp",
              "--adapter", f"dec={runs['dec']}", "--out", out)
    assert res.exit_code == 0, res.output
    m = read_manifest(out)
    assert m["adapters"]["ms"]["source"]["kind"] == "micro-sam" and m["shared_trunk"]["split_block"] == 2
    res = cli("merge-and-export", "--micro-sam", f"ms={ckpt};peft=lora;rank=8", "--adapter", f"dec={runs['dec']}",
              "--out", tmp_path / "bad")
    assert res.exit_code == 2 and "check --peft lora and its options" in res.output
    res = cli("merge-and-export", "--micro-sam", f"ms={ckpt};rnk=4", "--adapter", f"dec={runs['dec']}",
              "--out", tmp_path / "bad")
    assert res.exit_code == 2 and "'rnk=4' is not one of peft=" in res.output


def test_cli_predict_one_adapter_or_all(multi, image, tmp_path):
    import tifffile

    path = tmp_path / "img.tif"
    tifffile.imwrite(path, image)
    res = cli("predict", multi, path, "--box", "30,40,150,160", "--adapter", "late", "--out", tmp_path / "one", "-q")
    assert res.exit_code == 0, res.output
    assert "img.tif [late]: mask" in res.output and (tmp_path / "one" / "img_mask.tif").is_file()
    res = cli("predict", multi, path, "--box", "30,40,150,160", "--adapter", "all", "--out", tmp_path / "all", "-q")
    assert res.exit_code == 0, res.output
    session = SamSession(multi)
    session.set_image(image)
    for name in session.adapters:
        record = json.loads((tmp_path / "all" / name / "img_scores.json").read_text())
        assert record["adapter"] == name
        masks, _, _ = session.predict(box=BOXES[0], adapter=name)
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "all" / name / "img_mask.tif"),
                                      masks[record["best"]].astype(np.uint8))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "one" / "img_mask.tif"),
                                  tifffile.imread(tmp_path / "all" / "late" / "img_mask.tif"))
    res = cli("predict", multi, path, "--box", "30,40,150,160", "--out", tmp_path / "none")
    assert res.exit_code == 2 and "pass --adapter NAME or all" in res.output
    res = cli("predict", multi, path, "--box", "30,40,150,160", "--adapter", "nope", "--out", tmp_path / "none")
    assert res.exit_code == 2 and "unknown 'nope'" in res.output and not (tmp_path / "none").exists()


def test_evaluate_spec_picks_an_adapter(multi, single, image):
    from peft_export.evaluation.specs import load_predictor, parse_model_spec

    s = parse_model_spec(f"{multi}@int8#dec")
    assert (s.source, s.precision, s.adapter, s.name) == (str(multi), "int8", "dec", "export#dec@int8")
    t = parse_model_spec(f"{multi}#dec@int8")
    assert (t.source, t.precision, t.adapter) == (str(multi), "int8", "dec")
    loaded = load_predictor(parse_model_spec(f"x={multi}#late"))
    assert loaded.info["adapter"] == "late" and loaded.info["peft"]["method"] == "lora"
    loaded.predictor.set_image(image)
    ref = SamSession(multi)
    ref.set_image(image)
    np.testing.assert_array_equal(loaded.predictor.predict(box=BOXES[0])[0], ref.predict(box=BOXES[0], adapter="late")[0])
    with pytest.raises(PeftExportError, match="export holds adapters late, dec, dec2, stem; pick one with"):
        load_predictor(parse_model_spec(str(multi)))
    with pytest.raises(PeftExportError, match="unknown adapter 'nope'"):
        load_predictor(parse_model_spec(f"{multi}#nope"))
    with pytest.raises(PeftExportError, match="holds one model"):
        load_predictor(parse_model_spec(f"{single}#late"))
    with pytest.raises(PeftExportError, match="picks an adapter of an export dir"):
        parse_model_spec("random:tiny#late")


# ---- bench and the example ----------------------------------------------------------------------


def test_bench_times_trunk_and_each_head_in_a_fresh_process(multi, single):
    from peft_export.bench.shared_trunk import bench_shared_trunk, format_shared_table, mask_agreement

    result = bench_shared_trunk(multi, iterations=3, warmup=0)
    case = result["cases"][0]
    assert case["kind"] == "shared" and case["adapters"] == ["late", "dec", "dec2", "stem"]
    assert set(case["median_s"]) == {"trunk", "head late", "head dec", "head dec2", "head stem", "encoder total",
                                     "end to end"}
    # every part timed once per iteration asked, its median the median of those times, and each image's
    # end-to-end time holds its encoders plus the decoding of one box per adapter (more than the encoders)
    for part, times in case["times_s"].items():
        assert len(times) == 3 and case["median_s"][part] == pytest.approx(np.median(times), abs=1e-4), part
    for enc, e2e in zip(case["times_s"]["encoder total"], case["times_s"]["end to end"]):
        assert e2e > enc
    assert 0 < case["rss_loaded_mb"] <= case["peak_rss_mb"] < 2000
    assert re.search(r"^shared +trunk +\d+\.\d{3}$", format_shared_table(result), re.M)
    assert mask_agreement(multi, {"late": single})["late"] >= 0.999
    with pytest.raises(PeftExportError, match="give one export per adapter"):
        bench_shared_trunk(multi, {"late": single})
    res = cli("bench", single, "--separate", f"late={single}")
    assert res.exit_code == 2 and "not an export of several adapters" in res.output


def test_example_serves_several_adapters(multi, image, tmp_path):
    from PIL import Image

    png = tmp_path / "img.png"
    Image.fromarray(image).save(png)
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "serve_adapters.py"), str(multi), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert "serving late, dec, dec2, stem on http://" in line, proc.stderr.read() if not line else line
        url = line.split()[-1]
        assert json.load(urllib.request.urlopen(url + "/adapters"))["adapters"] == ["late", "dec", "dec2", "stem"]

        def segment(adapter: str) -> dict:
            req = urllib.request.Request(f"{url}/segment?adapter={adapter}&box=30,40,150,160", data=png.read_bytes())
            return json.load(urllib.request.urlopen(req))

        first, second, every = segment("late"), segment("dec"), segment("all")
        assert first["image_cached"] is False and second["image_cached"] is True and every["image_cached"] is True
        session = SamSession(multi)
        session.set_image(image)
        for name, r in every["results"].items():
            mask = session.predict(box=BOXES[0], multimask_output=False, adapter=name)[0][0]
            runs = np.asarray(r["rle"])
            flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
            np.testing.assert_array_equal(flat.reshape(r["shape"]), mask)
        assert every["results"]["late"] == first["results"]["late"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trunk_and_head_graphs_compose_to_the_encoder(runs, tmp_path, precision):
    from peft_export.export.trunk_graphs import export_head_onnx, export_trunk_onnx
    from peft_export.export.verify import ort_session

    model = merge_peft(load_adapter(runs["late"]).model).eval()
    for split in (1, 2, 4):  # 4 = every block in the trunk: the head is the neck alone
        export_trunk_onnx(model, tmp_path / f"t{split}.onnx", split, precision=precision)
        export_head_onnx(model, tmp_path / f"h{split}.onnx", split, precision=precision)
        x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(split))
        feats = ort_session(tmp_path / f"t{split}.onnx").run(None, {"image": x.numpy()})[0]
        assert feats.shape == (1, 16, 16, 64) and feats.dtype == np.float32
        emb = ort_session(tmp_path / f"h{split}.onnx").run(None, {"trunk_features": feats})[0]
        with torch.no_grad():
            want = model.image_encoder(x).numpy()
        rel = np.abs(emb - want).max() / np.abs(want).max()
        assert rel < (1e-4 if precision == "fp32" else 5e-3), (split, rel)
