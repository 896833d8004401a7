"""Parity of every exported graph with the torch adapter model (unmerged), in ONNX Runtime CPU
and, when it is installed, in OpenVINO (the same thresholds on each backend).

Reference: the adapter model itself, before merging, on ``peft_export.merge.probe_inputs``
(a realistic-statistics image and point / box / point+box prompts) plus one prompt with a
mask input and a batch of point prompts. Encoders are judged by their embeddings and by
the masks the torch decoder makes from them; decoders get the torch embedding and are
judged by their masks and IoU predictions.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam

from ..errors import PeftExportError
from ..merge import error_stats, probe_inputs
from .agreement import GATES, mask_agreement, meta_sparse
from .click_decoder import CLICK_GRAPH, verify_click_decoder
from .split_decoder import SPLIT_GRAPHS, verify_split_decoder
# The gate itself lives in gates.py (shared with the click / split / AIS decoders without an import circle);
# these names stay importable from here.
from .gates import (THRESHOLDS, cosine as _cosine, graph_runner, judge as _judge, mask_iou as _mask_iou,  # noqa: F401
                    nonfinite as _nonfinite, ort_session, verify_backends)

# What an encoder graph is judged on (each precision's THRESHOLDS that name them).
ENCODER_MEASURES = ("embeddings_max_rel", "embeddings_cosine", "mask_iou", "prompt_mask_iou_mean", "prompt_mask_iou_min")


@dataclass
class Prompt:
    coords: np.ndarray  # (B, N, 2) float32, Meta layout: box corners as labels 2/3, padding point if no box
    labels: np.ndarray  # (B, N) float32
    mask: np.ndarray | None  # (B, 1, 4g, 4g) or None


@dataclass
class Reference:
    image: torch.Tensor  # (1,3,S,S) normalised
    embeddings: torch.Tensor
    prompts: list[Prompt]
    low_res: list[torch.Tensor]  # per prompt (B,4,4g,4g)
    iou: list[torch.Tensor]  # per prompt (B,4)
    orig_size: tuple[int, int]
    input_size: tuple[int, int]
    upsampled: torch.Tensor  # masks of prompt 0 in orig_size (1,4,H,W)


def meta_prompt(points: torch.Tensor | None, labels: torch.Tensor | None, box: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """segment_anything's prompt tokens as Meta's ONNX decoder inputs (batched: leading B)."""
    parts_c, parts_l = [], []
    b = (points if points is not None else box).shape[0]
    if points is not None:
        parts_c.append(points.float())
        parts_l.append(labels.float())
    if box is not None:
        parts_c.append(box.float().reshape(b, 2, 2))
        parts_l.append(torch.tensor([[2.0, 3.0]]).expand(b, 2))
    else:
        parts_c.append(torch.zeros(b, 1, 2))
        parts_l.append(-torch.ones(b, 1))
    return torch.cat(parts_c, 1).numpy().astype(np.float32), torch.cat(parts_l, 1).numpy().astype(np.float32)


@torch.no_grad()
def _torch_decode(sam: Sam, emb: torch.Tensor, points, labels, box, mask) -> tuple[torch.Tensor, torch.Tensor]:
    sparse, dense = sam.prompt_encoder(
        points=(points.float(), labels) if points is not None else None,
        boxes=box.float() if box is not None else None,
        masks=mask,
    )
    # All 4 mask tokens, as the exported graphs return them (multimask_output slices 1:).
    return sam.mask_decoder.predict_masks(
        image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
    )


@torch.no_grad()
def build_reference(sam: Sam, seed: int = 0) -> Reference:
    """Run the (unmerged) torch model on the probe image and prompts."""
    sam = sam.eval()
    s = sam.image_encoder.img_size
    image, probe = probe_inputs(s, seed)
    emb = sam.image_encoder(image)
    raw = [(p["points"], p["labels"], p["box"], None) for p in probe]
    low0, _ = _torch_decode(sam, emb, *raw[0])
    # A corrective click with the previous low-res mask as mask input.
    raw.append((torch.tensor([[[0.55 * s, 0.45 * s], [0.2 * s, 0.8 * s]]]), torch.tensor([[1, 0]]), None, low0[:, :1]))
    # A batch of 3 prompts with 2 points each (decoder_lowres batching).
    g = torch.Generator().manual_seed(seed + 1)
    raw.append((torch.rand(3, 2, 2, generator=g) * s, torch.tensor([[1, 1], [1, 0], [0, 1]]), None, None))
    prompts, lows, ious = [], [], []
    for points, labels, box, mask in raw:
        coords, labs = meta_prompt(points, labels, box)
        low, iou = _torch_decode(sam, emb, points, labels, box, mask)
        prompts.append(Prompt(coords, labs, None if mask is None else mask.numpy().astype(np.float32)))
        lows.append(low)
        ious.append(iou)
    # Portrait, larger than S: crop + resize, and a crop unlike the export example's (landscape).
    orig = (int(round(s * 1.5)), int(round(s * 0.8)))
    scale = s / max(orig)
    input_size = (int(orig[0] * scale + 0.5), int(orig[1] * scale + 0.5))
    upsampled = sam.postprocess_masks(lows[0], input_size, orig)
    return Reference(image, emb, prompts, lows, ious, orig, input_size, upsampled)


@torch.no_grad()
def verify_encoder(path: str | os.PathLike, sam: Sam, reference: Reference, precision: str = "fp32",
                   backend: str = "onnxruntime") -> dict:
    """Encoder graph (input ``image``) vs the torch embeddings, and masks the torch decoder makes from it."""
    emb = graph_runner(path, backend)({"image": reference.image.numpy()})["image_embeddings"]
    return _encoder_stats(emb, sam, reference, precision)


def _encoder_stats(emb: np.ndarray, sam: Sam, reference: Reference, precision: str) -> dict:
    finite = not _nonfinite(emb)
    emb_t = torch.from_numpy(np.nan_to_num(emb)).float()
    lows, ious = [], []
    for p in reference.prompts:
        coords, labels = torch.from_numpy(p.coords), torch.from_numpy(p.labels)
        sparse = meta_sparse(sam, coords, labels)
        mask = torch.from_numpy(p.mask) if p.mask is not None else None
        _, dense = sam.prompt_encoder(points=None, boxes=None, masks=mask)
        dense = dense.expand(coords.shape[0], -1, -1, -1)
        low, iou = sam.mask_decoder.predict_masks(
            image_embeddings=emb_t, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        )
        lows.append(low)
        ious.append(iou)
    stats = {
        "embeddings": error_stats(reference.embeddings, emb_t),
        "embeddings_cosine": _cosine(reference.embeddings, emb_t),
        "mask_logits": error_stats(torch.cat([x.flatten() for x in reference.low_res]), torch.cat([x.flatten() for x in lows])),
        "mask_iou": _mask_iou(reference.low_res, lows),
        "iou_predictions_max_abs": float(max((a - b).abs().max() for a, b in zip(reference.iou, ious))),
        "finite": finite,
    }
    stats["embeddings_max_rel"] = stats["embeddings"]["max_rel"]
    if precision in GATES:
        gate = mask_agreement(sam, reference.embeddings, emb, int(GATES[precision]["prompts"]))
        stats["prompt_agreement"] = gate
        stats["prompt_mask_iou_mean"], stats["prompt_mask_iou_min"] = gate["mask_iou_mean"], gate["mask_iou_min"]
    return _judge(stats, precision, ENCODER_MEASURES)


@torch.no_grad()
def verify_preprocess_encoder(path: str | os.PathLike, sam: Sam, reference: Reference, precision: str = "fp32",
                              backend: str = "onnxruntime") -> dict:
    """``encoder_preprocess`` (resized HWC 0..255 input) vs the torch model on the same image, non-square."""
    s = sam.image_encoder.img_size
    h, w = reference.input_size
    g = torch.Generator().manual_seed(3)
    hwc = (torch.rand(h, w, 3, generator=g) * 255).round()
    x = (hwc.permute(2, 0, 1)[None] - sam.pixel_mean[None]) / sam.pixel_std[None]
    x = torch.nn.functional.pad(x, (0, s - w, 0, s - h))
    ref = sam.image_encoder(x)
    emb = graph_runner(path, backend)({"image": hwc.numpy().astype(np.float32)})["image_embeddings"]
    stats = {
        "input_shape": [h, w, 3],
        "embeddings": error_stats(ref, torch.from_numpy(emb)),
        "embeddings_cosine": _cosine(ref, torch.from_numpy(emb)),
        "finite": not _nonfinite(emb),
    }
    stats["embeddings_max_rel"] = stats["embeddings"]["max_rel"]
    return _judge(stats, precision, ("embeddings_max_rel", "embeddings_cosine"))


def decoder_feeds(reference: Reference, prompt: Prompt, flavour: str) -> dict[str, np.ndarray]:
    b = prompt.coords.shape[0]
    g4 = reference.low_res[0].shape[-1]
    feeds = {
        "image_embeddings": reference.embeddings.numpy().astype(np.float32),
        "point_coords": prompt.coords,
        "point_labels": prompt.labels,
        "mask_input": prompt.mask if prompt.mask is not None else np.zeros((b, 1, g4, g4), np.float32),
        "has_mask_input": np.full((b,), 1.0 if prompt.mask is not None else 0.0, np.float32),
    }
    if flavour == "decoder":
        feeds["has_mask_input"] = feeds["has_mask_input"][:1]
        feeds["orig_im_size"] = np.array(reference.orig_size, np.float32)
    return feeds


@torch.no_grad()
def verify_decoder(path: str | os.PathLike, reference: Reference, flavour: str, precision: str = "fp32",
                   backend: str = "onnxruntime") -> dict:
    """A decoder graph, fed the torch embedding, vs the torch prompt encoder + mask decoder."""
    run = graph_runner(path, backend)
    lows, ious, finite, upsampled = [], [], True, None
    prompts = reference.prompts
    for i, p in enumerate(prompts):
        if flavour == "decoder" and p.coords.shape[0] != 1:
            lows.append(None)
            ious.append(None)
            continue  # Meta's interface takes one prompt at a time
        feeds = decoder_feeds(reference, p, flavour)
        out = run(feeds)
        if flavour == "decoder":
            masks, iou, low = out["masks"], out["iou_predictions"], out["low_res_masks"]
            if i == 0:
                upsampled = torch.from_numpy(masks)
            finite &= not _nonfinite(masks)
        else:
            low, iou = out["low_res_masks"], out["iou_predictions"]
        finite &= not _nonfinite(low, iou)
        lows.append(torch.from_numpy(low))
        ious.append(torch.from_numpy(iou))
    keep = [i for i, x in enumerate(lows) if x is not None]
    ref_low = [reference.low_res[i] for i in keep]
    stats = {
        "num_prompts": len(keep),
        "mask_logits": error_stats(torch.cat([x.flatten() for x in ref_low]), torch.cat([lows[i].flatten() for i in keep])),
        "mask_iou": _mask_iou(ref_low, [lows[i] for i in keep]),
        "iou_predictions_max_abs": float(max((reference.iou[i] - ious[i]).abs().max() for i in keep)),
        "finite": bool(finite),
    }
    stats["mask_logits_max_rel"] = stats["mask_logits"]["max_rel"]
    if upsampled is not None:
        if tuple(upsampled.shape[-2:]) != reference.orig_size:
            raise PeftExportError(
                f"{path}: masks have size {tuple(upsampled.shape[-2:])}, expected orig_im_size {reference.orig_size}"
            )
        stats["upsampled_mask_iou"] = _mask_iou([reference.upsampled], [upsampled])
        stats["mask_iou"] = min(stats["mask_iou"], stats["upsampled_mask_iou"])
    return _judge(stats, precision, ("mask_logits_max_rel", "mask_iou"))


def verify_export(
    path: str | os.PathLike, graph: str, sam: Sam, reference: Reference | None = None, precision: str = "fp32",
    backend: str = "onnxruntime",
) -> dict:
    """Parity of one exported graph ("encoder", "encoder_preprocess", "decoder", "decoder_lowres")
    with the torch model ``sam`` (pass the unmerged adapter model), run on ``backend``. Returns the
    parity dict (``passed`` says whether it is within the thresholds of ``precision``)."""
    reference = reference or build_reference(sam)
    if graph == "encoder":
        return verify_encoder(path, sam, reference, precision, backend)
    if graph == "encoder_preprocess":
        return verify_preprocess_encoder(path, sam, reference, precision, backend)
    if graph in ("decoder", "decoder_lowres"):
        return verify_decoder(path, reference, graph, precision, backend)
    if graph in SPLIT_GRAPHS:  # the three graphs are checked as one chain
        return verify_split_decoder(Path(path).parent, reference, precision, backend)
    if graph == CLICK_GRAPH:  # with split_image from the same folder
        return verify_click_decoder(path, reference, precision, backend)
    raise PeftExportError(f"verify: unknown graph {graph!r}")


def format_parity_table(rows: list[tuple[str, str, dict]]) -> str:
    """One line per (graph, precision): the errors and whether it passed."""
    w = max([20] + [len(graph) + 2 for graph, _, _ in rows])  # per-adapter graph names run longer
    head = f"{'graph':<{w}}{'precision':<10}{'emb max rel':>12}{'emb cosine':>12}{'logit max rel':>14}{'mask IoU':>10}{'IoU-pred diff':>14}{'AIS maps err':>13}  result"
    lines = [head, "-" * len(head)]
    for graph, precision, p in rows:
        emb_rel = p.get("embeddings", {}).get("max_rel")
        cos = p.get("embeddings_cosine")
        logit = p.get("mask_logits", {}).get("max_rel")
        miou = p.get("mask_iou")
        dio = p.get("iou_predictions_max_abs")
        maps = p.get("maps_max_abs")

        def f(v, spec):
            return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))

        lines.append(
            f"{graph:<{w}}{precision:<10}{f(emb_rel, '12.2e')}{f(cos, '12.6f')}{f(logit, '14.2e')}"
            f"{f(miou, '10.5f')}{f(dio, '14.2e')}{f(maps, '13.2e')}  {'ok' if p['passed'] else 'FAILED'}"
        )
    return "\n".join(lines)
