"""Prompts in the conventions of Meta's ONNX decoder (segment_anything/utils/onnx.py).

Coordinates are moved into the resized S frame; a box becomes two corner points with
labels 2 and 3 appended after the points; without a box one padding point (0, 0)
with label -1 is appended (the torch prompt encoder pads the same way internally).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..errors import PeftExportError
from .preprocess import transform_boxes, transform_coords


def _check_inside(coords: np.ndarray, original_size: Tuple[int, int], what: str) -> None:
    h, w = original_size
    if not np.isfinite(coords).all():
        raise PeftExportError(f"{what}: coordinates must be finite")
    x, y = coords[..., 0], coords[..., 1]
    if (x < 0).any() or (y < 0).any() or (x > w).any() or (y > h).any():
        raise PeftExportError(f"{what}: coordinates outside the image (width {w}, height {h}); use x,y pixel coordinates")


def check_points(point_coords, point_labels, original_size: Tuple[int, int], batched: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Validate points (N,2)/(N,) or, batched, (K,N,2)/(K,N); labels must be 0 or 1."""
    if point_coords is None or point_labels is None:
        raise PeftExportError("point_coords: point_labels must be given together with point_coords")
    coords = np.asarray(point_coords, dtype=np.float64)
    labels = np.asarray(point_labels)
    nd = 3 if batched else 2
    if coords.ndim != nd or coords.shape[-1] != 2 or coords.shape[-2] < 1:
        want = "(K, N, 2)" if batched else "(N, 2)"
        raise PeftExportError(f"point_coords: expected shape {want}, got {coords.shape}")
    if labels.shape != coords.shape[:-1]:
        raise PeftExportError(f"point_labels: expected shape {coords.shape[:-1]}, got {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise PeftExportError("point_labels: labels must be 1 (foreground) or 0 (background)")
    _check_inside(coords, original_size, "point_coords")
    return coords, labels.astype(np.float32)


def check_boxes(box, original_size: Tuple[int, int], batched: bool = False) -> np.ndarray:
    """Validate XYXY boxes: (4,) or (1,4), or batched (K,4); x0<=x1, y0<=y1."""
    boxes = np.asarray(box, dtype=np.float64)
    if not batched and boxes.shape in ((4,), (1, 4)):
        boxes = boxes.reshape(1, 4)
    elif not (batched and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) >= 1):
        want = "(K, 4)" if batched else "(4,)"
        raise PeftExportError(f"box: expected XYXY shape {want}, got {boxes.shape}")
    _check_inside(boxes.reshape(-1, 2, 2), original_size, "box")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise PeftExportError("box: expected XYXY with x0 <= x1 and y0 <= y1")
    return boxes


def encode_prompts(
    points: Optional[np.ndarray],
    labels: Optional[np.ndarray],
    boxes: Optional[np.ndarray],
    original_size: Tuple[int, int],
    image_size: int,
) -> Tuple[np.ndarray, np.ndarray]:
    """Checked prompts (K,N,2)/(K,N)/(K,4) in image coords -> decoder (K,M,2) coords, (K,M) labels."""
    if points is None and boxes is None:
        raise PeftExportError("predict: give point_coords or box (a mask_input alone is not a prompt)")
    k = len(points) if points is not None else len(boxes)
    parts_c, parts_l = [], []
    if points is not None:
        parts_c.append(transform_coords(points, original_size, image_size))
        parts_l.append(labels.astype(np.float32))
    if boxes is not None:
        if len(boxes) != k:
            raise PeftExportError(f"box: {len(boxes)} boxes for {k} point sets")
        parts_c.append(transform_boxes(boxes, original_size, image_size).reshape(k, 2, 2))
        parts_l.append(np.tile(np.array([[2, 3]], dtype=np.float32), (k, 1)))
    else:
        parts_c.append(np.zeros((k, 1, 2)))
        parts_l.append(np.full((k, 1), -1, dtype=np.float32))
    return np.concatenate(parts_c, axis=1).astype(np.float32), np.concatenate(parts_l, axis=1).astype(np.float32)


def mask_input_feed(mask_input: Optional[np.ndarray], k: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """The decoder's ``mask_input`` (k, 1, size, size) and ``has_mask_input`` (k,) for ``k`` prompts: zeros
    without a mask; one prompt may carry a previous predict's low-res logits (size x size)."""
    if mask_input is None:
        return np.zeros((k, 1, size, size), np.float32), np.zeros((k,), np.float32)
    m = np.asarray(mask_input, dtype=np.float32)
    if m.shape in ((size, size), (1, size, size), (1, 1, size, size)) and k == 1:
        return m.reshape(1, 1, size, size), np.ones((1,), np.float32)
    raise PeftExportError(f"mask_input: expected shape (1, {size}, {size}) (low-res logits of a previous predict), "
                          f"got {m.shape}")
