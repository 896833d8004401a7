"""Segment-everything (SamAutomaticMaskGenerator with one crop) in numpy.

Follows segment_anything/automatic_mask_generator.py and utils/amg.py step by step:
a point grid, a batched decoder call per group of points (multimask outputs 1..3),
the predicted-IoU filter, the stability-score filter on the upsampled logits,
box NMS, and optionally hole/island removal (cv2's 8-connected components are
replaced by a numpy run-length labeller). The masks are then painted into one
instance label image.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from ..errors import PeftExportError
from .postprocess import postprocess_masks
from .preprocess import transform_coords

# decode(points_xy (B,1,2) resized frame, labels (B,1)) -> (low_res (B,4,4g,4g), iou (B,4))
DecodeFn = Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]

# SamAutomaticMaskGenerator's crop_nms_thresh default; postprocess_small_regions uses
# max(box_nms_thresh, crop_nms_thresh).
_CROP_NMS_THRESH = 0.7


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) xy points in [0,1]x[0,1], evenly spaced cell centres (amg.build_point_grid)."""
    offset = 1 / (2 * n_per_side)
    points_one_side = np.linspace(offset, 1 - offset, n_per_side)
    points_x = np.tile(points_one_side[None, :], (n_per_side, 1))
    points_y = np.tile(points_one_side[:, None], (1, n_per_side))
    return np.stack([points_x, points_y], axis=-1).reshape(-1, 2)


def calculate_stability_score(masks: np.ndarray, mask_threshold: float, threshold_offset: float) -> np.ndarray:
    """IoU between the masks thresholded at thr+offset and thr-offset (amg.calculate_stability_score)."""
    inter = (masks > (mask_threshold + threshold_offset)).sum(axis=(-1, -2), dtype=np.int64)
    union = (masks > (mask_threshold - threshold_offset)).sum(axis=(-1, -2), dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (inter / union).astype(np.float32)


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
    """Indices kept by greedy NMS, highest score first (torchvision.ops.nms semantics)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
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
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou > iou_threshold]] = True
    return np.asarray(keep, dtype=np.int64)


def _runs(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True pixels: (row, start, end exclusive), in raster order."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1).ravel()
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    width = w + 1
    return starts // width, starts % width, ends % width


def _run_components(row: np.ndarray, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
    """8-connected component of every run, named by the first run (raster order) in it."""
    n = len(row)
    parent = np.arange(n)
    if n < 2:
        return parent
    stride = width + 2
    start_key = row * stride + start
    end_key = row * stride + end
    # Runs in row r+1 touch runs in row r with s1 <= e2 and s2 <= e1 (8-connectivity).
    lo = np.searchsorted(end_key, (row - 1) * stride + start, side="left")
    hi = np.searchsorted(start_key, (row - 1) * stride + end, side="right")
    count = np.clip(hi - lo, 0, None)
    if count.sum() == 0:
        return parent
    b = np.repeat(np.arange(n), count)
    a = np.repeat(lo, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    # Vectorised union-find: hook larger roots onto smaller ones, then compress fully.
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(pa, pb)[differ], np.minimum(pa, pb)[differ])
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


def label_components(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """8-connected components: (int32 labels HxW, 0 = background, 1.. in raster order; sizes (n,))."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    row, start, end = _runs(mask)
    root = _run_components(row, start, end, w)
    roots, comp = np.unique(root, return_inverse=True)
    lengths = end - start
    sizes = np.bincount(comp, weights=lengths, minlength=len(roots)).astype(np.int64)
    labels = np.zeros(h * w, dtype=np.int32)
    _paint_runs(labels, row * w + start, lengths, (comp + 1).astype(np.int32))
    return labels.reshape(h, w), sizes


def _paint_runs(flat: np.ndarray, flat_start: np.ndarray, lengths: np.ndarray, values) -> None:
    total = int(lengths.sum())
    if total == 0:
        return
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat[np.repeat(flat_start, lengths) + offsets] = np.repeat(values, lengths) if np.ndim(values) else values


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """amg.remove_small_regions: fill small holes ("holes") or drop small islands ("islands")."""
    if mode not in ("holes", "islands"):
        raise PeftExportError(f"remove_small_regions: mode must be 'holes' or 'islands', got '{mode}'")
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    correct_holes = mode == "holes"
    working = ~mask if correct_holes else mask
    row, start, end = _runs(working)
    root = _run_components(row, start, end, w)
    roots, comp = np.unique(root, return_inverse=True)
    lengths = end - start
    sizes = np.bincount(comp, weights=lengths, minlength=len(roots))
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if correct_holes:
        fill = small
        out = mask.copy().ravel()
    else:
        fill = ~small
        if not fill.any():
            fill = np.zeros_like(small)
            fill[int(np.argmax(sizes))] = True
        out = np.zeros(h * w, dtype=bool)
    run_fill = fill[comp]
    _paint_runs(out, (row * w + start)[run_fill], lengths[run_fill], True)
    return out.reshape(h, w), True


def _crop(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    return mask[box[1] : box[3] + 1, box[0] : box[2] + 1].copy()


def _uncrop(crop: np.ndarray, box: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    full = np.zeros(size, dtype=bool)
    full[box[1] : box[3] + 1, box[0] : box[2] + 1] = crop
    return full


def segment_everything(
    decode: DecodeFn,
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
    upsample_chunk: int = 16,
) -> Tuple[np.ndarray, List[Dict]]:
    """Automatic instance segmentation of one image through a batched low-res decoder.

    Returns (labels int32 HxW, records). ``records[i]`` describes label ``i + 1`` and
    has "area" (pixels of the whole mask), "bbox" (XYWH as SAM), "predicted_iou",
    "stability_score", "point_coords" ([[x, y]] in image coordinates); records are in
    SamAutomaticMaskGenerator's output order. Masks are painted largest first, so a
    smaller mask lying on a larger one stays visible; a mask fully covered by smaller
    ones keeps its record but has no pixels in ``labels``.
    """
    if points_per_side < 1 or points_per_batch < 1:
        raise PeftExportError("segment_everything: points_per_side and points_per_batch must be >= 1")
    h, w = int(original_size[0]), int(original_size[1])
    points = build_point_grid(points_per_side) * np.array([w, h], dtype=np.float64)[None, :]

    crops: List[np.ndarray] = []
    boxes: List[np.ndarray] = []
    ious: List[float] = []
    stabs: List[float] = []
    pts: List[np.ndarray] = []
    for b0 in range(0, len(points), points_per_batch):
        batch = points[b0 : b0 + points_per_batch]
        coords = transform_coords(batch, (h, w), image_size).astype(np.float32)[:, None, :]
        labels = np.ones((len(batch), 1), dtype=np.float32)
        low_res, iou = decode(coords, labels)
        low_res, iou = np.asarray(low_res), np.asarray(iou)
        if low_res.ndim != 4 or low_res.shape[:2] != (len(batch), 4) or iou.shape != (len(batch), 4):
            raise PeftExportError(f"segment_everything: decoder returned shapes {low_res.shape}, {iou.shape}")
        # multimask_output=True keeps mask tokens 1..3; flatten point-major like MaskData.
        low_res = low_res[:, 1:].reshape(-1, *low_res.shape[-2:])
        iou = iou[:, 1:].reshape(-1)
        point_of = np.repeat(batch, 3, axis=0)
        keep = np.flatnonzero(iou > pred_iou_thresh) if pred_iou_thresh > 0.0 else np.arange(len(iou))
        for c0 in range(0, len(keep), upsample_chunk):
            idx = keep[c0 : c0 + upsample_chunk]
            logits = postprocess_masks(low_res[idx], input_size, (h, w), image_size)
            stab = calculate_stability_score(logits, mask_threshold, stability_score_offset)
            ok = stab >= stability_score_thresh if stability_score_thresh > 0.0 else np.ones(len(idx), bool)
            masks = logits[ok] > mask_threshold
            mboxes = batched_mask_to_box(masks)
            for m, bx, i, s in zip(masks, mboxes, idx[ok], stab[ok]):
                crops.append(_crop(m, bx))
                boxes.append(bx)
                ious.append(float(iou[i]))
                stabs.append(float(s))
                pts.append(point_of[i])

    order = np.arange(len(boxes))
    if len(boxes):
        order = box_nms(np.stack(boxes), np.asarray(ious, dtype=np.float32), box_nms_thresh)
    if min_mask_region_area > 0 and len(order):
        order = _postprocess_small_regions(
            order, crops, boxes, (h, w), min_mask_region_area, max(box_nms_thresh, _CROP_NMS_THRESH)
        )

    records: List[Dict] = []
    label_image = np.zeros((h, w), dtype=np.int32)
    areas = [int(crops[i].sum()) for i in order]
    for i, area in zip(order, areas):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        records.append(
            {
                "area": area,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "predicted_iou": ious[i],
                "stability_score": stabs[i],
                "point_coords": [[float(pts[i][0]), float(pts[i][1])]],
            }
        )
    for k in np.argsort(-np.asarray(areas, dtype=np.int64), kind="stable"):
        i = order[k]
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        region = label_image[y0 : y1 + 1, x0 : x1 + 1]
        region[crops[i]] = k + 1
    return label_image, records


def _postprocess_small_regions(
    order: np.ndarray,
    crops: List[np.ndarray],
    boxes: List[np.ndarray],
    size: Tuple[int, int],
    min_area: int,
    nms_thresh: float,
) -> np.ndarray:
    """SamAutomaticMaskGenerator.postprocess_small_regions on the NMS survivors (updates crops/boxes)."""
    new_crops, new_boxes, scores = [], [], []
    for i in order:
        mask = _uncrop(crops[i], boxes[i], size)
        mask, changed = remove_small_regions(mask, min_area, mode="holes")
        unchanged = not changed
        mask, changed = remove_small_regions(mask, min_area, mode="islands")
        unchanged = unchanged and not changed
        box = batched_mask_to_box(mask)
        new_boxes.append(box)
        new_crops.append(_crop(mask, box))  # keep only the crop: full masks add up fast
        scores.append(float(unchanged))
    keep = box_nms(np.stack(new_boxes), np.asarray(scores), nms_thresh)
    for k in keep:
        if scores[k] == 0.0:
            i = order[k]
            boxes[i] = new_boxes[k]
            crops[i] = new_crops[k]
    return order[keep]
