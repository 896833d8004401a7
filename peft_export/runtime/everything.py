"""Segment-everything: SamAutomaticMaskGenerator (one crop) in numpy, in the order it filters.

The same steps as segment_anything's ``automatic_mask_generator.py`` and ``utils/amg.py``:
a point grid; per batch of points the decoder's 3 multimask outputs; the predicted-IoU
filter; the stability score (IoU of the upsampled logits cut at ``threshold ± offset``) and
its filter; masks cut at the threshold; box NMS; optionally hole / island removal and a
second NMS. What differs is only where work is skipped, never a value:

- the decoder is asked for masks only of the prompts with a mask above the IoU threshold
  (``PromptDecoder``: with the split decoder graphs the upscaling of the others never runs);
- no mask is upsampled whole: ``mask_runs.threshold_upsampled`` gives the exact pixel counts
  and the mask as runs from the part of the image the mask can reach.

Records equal the generator's (same candidates, order, boxes, areas, masks, scores) for the
same decoder outputs, with PyTorch's CPU upsampling rounding; two ways they can part: NMS
ties between equal scores when more than 1000 masks reach NMS (torchvision then re-sorts
them with an unstable sort), and torch running one thread (a kernel rounding differently).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import numpy as np

from ..errors import PeftExportError
from .mask_runs import MaskRuns, paint_runs, threshold_upsampled
from .postprocess import MaskUpsampler
from .preprocess import transform_coords
from .regions import remove_small_regions

# SamAutomaticMaskGenerator's crop_nms_thresh default; postprocess_small_regions uses
# max(box_nms_thresh, crop_nms_thresh).
_CROP_NMS_THRESH = 0.7
FILTERS = ("pred_iou", "stability", "nms", "small_regions")


class PromptDecoder(Protocol):
    """A decoder that gives IoU predictions first and masks only for the prompts asked for."""

    def prompts(self, coords: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, Any]:
        """(B,M,2) float64 points in the resized frame, (B,M) labels -> IoU (B,4), state for ``masks``.

        No padding point is passed: the decoder adds what its graph needs.
        """

    def masks(self, state: Any, index: np.ndarray) -> np.ndarray:
        """Low-res logits (K,4,4g,4g) of the prompts ``index`` of that batch."""


class LowResDecoder:
    """A ``PromptDecoder`` over a function that decodes everything at once (``decoder_lowres``)."""

    def __init__(self, decode: Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]) -> None:
        self.decode = decode

    def prompts(self, coords: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, Any]:
        low, iou = self.decode(coords, labels)
        return iou, low

    def masks(self, state: Any, index: np.ndarray) -> np.ndarray:
        return np.asarray(state)[index]


class MaskRecords(list):
    """The records of ``segment_everything`` (a list) plus ``summary``: what each filter removed."""

    summary: Dict[str, Any]


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) xy points in [0,1]x[0,1], evenly spaced cell centres (amg.build_point_grid)."""
    offset = 1 / (2 * n_per_side)
    points_one_side = np.linspace(offset, 1 - offset, n_per_side)
    points_x = np.tile(points_one_side[None, :], (n_per_side, 1))
    points_y = np.tile(points_one_side[:, None], (1, n_per_side))
    return np.stack([points_x, points_y], axis=-1).reshape(-1, 2)


def calculate_stability_score(masks: np.ndarray, mask_threshold: float, threshold_offset: float) -> np.ndarray:
    """IoU between the masks thresholded at thr+offset and thr-offset (amg.calculate_stability_score)."""
    inter = (masks > np.float32(mask_threshold + threshold_offset)).sum(axis=(-1, -2), dtype=np.int64)
    union = (masks > np.float32(mask_threshold - threshold_offset)).sum(axis=(-1, -2), dtype=np.int64)
    return _ratio(inter, union)


def _ratio(inter, union) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):  # torch divides the integer counts in float32
        return np.asarray(inter, np.float32) / np.asarray(union, np.float32)


def batched_mask_to_box(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) bool -> (..., 4) XYXY int boxes, inclusive max, [0,0,0,0] for empty masks."""
    h, w = masks.shape[-2:]
    rows = masks.any(axis=-1)
    cols = masks.any(axis=-2)
    empty = ~rows.any(axis=-1)
    top = np.where(empty, 0, rows.argmax(axis=-1))
    bottom = np.where(empty, 0, h - 1 - rows[..., ::-1].argmax(axis=-1))
    left = np.where(empty, 0, cols.argmax(axis=-1))
    right = np.where(empty, 0, w - 1 - cols[..., ::-1].argmax(axis=-1))
    return np.stack([left, top, right, bottom], axis=-1).astype(np.int64)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first: torchvision.ops.nms on float32 boxes."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if len(rest) == 0:
            continue
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou.astype(np.float64) > iou_threshold]] = True  # float IoU, double threshold
    return np.asarray(keep, dtype=np.int64)


def _check_batch(iou: np.ndarray, b: int) -> np.ndarray:
    iou = np.asarray(iou, np.float32)
    if iou.shape != (b, 4):
        raise PeftExportError(f"segment_everything: decoder returned IoU shape {iou.shape}, expected ({b}, 4)")
    return iou


def segment_everything(
    decode,
    original_size: Tuple[int, int],
    input_size: Tuple[int, int],
    image_size: int,
    points_per_side: int = 32,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    box_nms_thresh: float = 0.7,
    min_mask_region_area: int = 0,
    stability_score_offset: float = 1.0,
    mask_threshold: float = 0.0,
    return_masks: bool = False,
    to_model_frame: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> Tuple[np.ndarray, MaskRecords]:
    """Automatic instance segmentation of one image.

    ``decode`` is a ``PromptDecoder`` or a function (coords (B,M,2), labels (B,M)) ->
    (low-res logits (B,4,4g,4g), IoU (B,4)). Returns (labels int32 HxW, records).
    ``records[i]`` describes label ``i + 1`` and has "area", "bbox" (XYWH as SAM),
    "predicted_iou", "stability_score", "point_coords" ([[x, y]] in image coordinates), and
    with ``return_masks`` "segmentation" (HxW bool), in SamAutomaticMaskGenerator's order.
    ``records.summary`` counts the candidates each filter removed. Masks are painted
    largest first, so a smaller mask lying on a larger one stays visible; a mask fully
    covered by smaller ones keeps its record but has no pixels in ``labels``.
    """
    if points_per_side < 1 or points_per_batch < 1:
        raise PeftExportError("segment_everything: points_per_side and points_per_batch must be >= 1")
    decoder = decode if hasattr(decode, "masks") else LowResDecoder(decode)
    h, w = int(original_size[0]), int(original_size[1])
    points = build_point_grid(points_per_side) * np.array([w, h], dtype=np.float64)[None, :]
    cuts = (mask_threshold + stability_score_offset, mask_threshold - stability_score_offset)
    removed = dict.fromkeys(FILTERS, 0)
    upsampler: Optional[MaskUpsampler] = None
    runs: List[MaskRuns] = []
    ious: List[np.float32] = []
    stabs: List[np.float32] = []
    pts: List[np.ndarray] = []
    for b0 in range(0, len(points), points_per_batch):
        batch = points[b0 : b0 + points_per_batch]
        if to_model_frame is not None:
            coords = to_model_frame(batch)[:, None, :]
        else:
            coords = transform_coords(batch, (h, w), image_size)[:, None, :]  # float64, as the generator passes them
        iou, state = decoder.prompts(coords, np.ones((len(batch), 1), np.float32))
        iou = _check_batch(iou, len(batch))[:, 1:]  # multimask_output=True keeps mask tokens 1..3
        keep = iou > np.float32(pred_iou_thresh) if pred_iou_thresh > 0.0 else np.ones(iou.shape, bool)
        removed["pred_iou"] += int((~keep).sum())
        wanted = np.flatnonzero(keep.any(axis=1))
        if len(wanted) == 0:
            continue
        low = np.asarray(decoder.masks(state, wanted), np.float32)
        if low.ndim != 4 or low.shape[:2] != (len(wanted), 4):
            raise PeftExportError(f"segment_everything: decoder returned masks of shape {low.shape}")
        if upsampler is None:
            upsampler = MaskUpsampler(low.shape[-1], input_size, (h, w), image_size)
        for j, p in enumerate(wanted):  # point-major, mask-minor: the generator's order
            for m in np.flatnonzero(keep[p]):
                (inter, union), mask = threshold_upsampled(upsampler, low[j, 1 + m], cuts, mask_threshold)
                stab = _ratio(inter, union)
                if stability_score_thresh > 0.0 and not stab >= np.float32(stability_score_thresh):
                    removed["stability"] += 1
                    continue
                runs.append(mask)
                ious.append(iou[p, m])
                stabs.append(stab)
                pts.append(batch[p])

    boxes = [r.box() for r in runs]
    order = np.arange(len(runs))
    if len(runs):
        order = box_nms(np.stack(boxes), np.asarray(ious, np.float32), box_nms_thresh)
    removed["nms"] = len(runs) - len(order)
    if min_mask_region_area > 0 and len(order):
        n = len(order)
        order = _postprocess_small_regions(
            order, runs, boxes, (h, w), min_mask_region_area, max(box_nms_thresh, _CROP_NMS_THRESH)
        )
        removed["small_regions"] = n - len(order)

    records = MaskRecords()
    for i in order:
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        rec = {
            "area": runs[i].area,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "predicted_iou": float(ious[i]),
            "stability_score": float(stabs[i]),
            "point_coords": [[float(pts[i][0]), float(pts[i][1])]],
        }
        if return_masks:
            rec["segmentation"] = runs[i].to_mask((h, w))
        records.append(rec)
    records.summary = {
        "points": len(points),
        "candidates": 3 * len(points),
        "removed": removed,
        "objects": len(records),
        "thresholds": {"pred_iou": pred_iou_thresh, "stability": stability_score_thresh,
                       "nms": box_nms_thresh, "min_region_area": min_mask_region_area},
    }
    return paint_labels([runs[i] for i in order], (h, w)), records


def paint_labels(masks: List[MaskRuns], size: Tuple[int, int]) -> np.ndarray:
    """Instance labels (int32): mask k is label k + 1, painted largest first so small ones stay on top."""
    labels = np.zeros(size[0] * size[1], dtype=np.int32)
    areas = np.asarray([m.area for m in masks], dtype=np.int64)
    for k in np.argsort(-areas, kind="stable"):
        m = masks[k]
        paint_runs(labels, m.rows * size[1] + m.starts, m.ends - m.starts, k + 1)
    return labels.reshape(size)


def _postprocess_small_regions(
    order: np.ndarray, runs: List[MaskRuns], boxes: List[np.ndarray], size: Tuple[int, int], min_area: int,
    nms_thresh: float,
) -> np.ndarray:
    """SamAutomaticMaskGenerator.postprocess_small_regions on the NMS survivors (updates runs/boxes).

    Each mask is made whole for its connected components, one at a time.
    """
    new_runs, new_boxes, scores = [], [], []
    for i in order:
        mask = runs[i].to_mask(size)
        mask, changed = remove_small_regions(mask, min_area, mode="holes")
        unchanged = not changed
        mask, changed = remove_small_regions(mask, min_area, mode="islands")
        unchanged = unchanged and not changed
        new_runs.append(MaskRuns.from_mask(mask))
        new_boxes.append(new_runs[-1].box())
        scores.append(float(unchanged))
    keep = box_nms(np.stack(new_boxes), np.asarray(scores), nms_thresh)
    for k in keep:
        if scores[k] == 0.0:
            runs[order[k]], boxes[order[k]] = new_runs[k], new_boxes[k]
    return order[keep]


def filter_report(summary: Dict[str, Any], option_names: Optional[Dict[str, str]] = None) -> str:
    """One paragraph: how many candidates each filter removed and which option relaxes it."""
    names = {"pred_iou": "pred_iou_thresh", "stability": "stability_score_thresh", "nms": "box_nms_thresh",
             "small_regions": "min_mask_region_area"}
    names.update(option_names or {})
    how = {"pred_iou": "lower", "stability": "lower", "nms": "raise", "small_regions": "lower (0 turns it off)"}
    what = {"pred_iou": "predicted IoU <= {}", "stability": "stability score < {}", "nms": "box NMS (IoU > {})",
            "small_regions": "small-region cleanup (min area {})"}
    key = {"pred_iou": "pred_iou", "stability": "stability", "nms": "nms", "small_regions": "min_region_area"}
    t, removed = summary["thresholds"], summary["removed"]
    parts = [f"{what[f].format(t[key[f]])} removed {removed[f]} ({how[f]} {names[f]})" for f in FILTERS if removed[f]]
    text = (f"{summary['objects']} objects from {summary['candidates']} candidates "
            f"({summary['points']} points x 3 masks)")
    return text + (": " + "; ".join(parts) if parts else "")
