"""Prompts derived from a mask, as micro-sam derives them when it carries an object from one slice to
the next (``prompt_based_segmentation.segment_from_mask``):

- box: the mask's bounding box (x0, y0, x1 + 1, y1 + 1), grown by ``box_extension`` (a fraction of
  its height / width when < 1, else pixels), clipped to the plane, rounded half to even;
- points: inside the (extended) box, the distance to the object's outer boundary, smoothed
  (Gaussian sigma 1); positive points at its local maxima inside the object (at least 3 px apart),
  negative ones at those outside (at least 5 px apart); ``single_point``: the one largest inside;
- mask: the binary mask resized (antialiased bilinear, long side = the decoder's low-res size),
  thresholded at 0.5, padded, as logits +-log(999).

The distance transform and the smoothing are bioimage-cpp's (what micro-sam calls), the maxima
scikit-image's ``peak_local_max``; the outer boundary is scikit-image's ``find_boundaries(mode="outer")``
of a binary mask, computed with four shifted ORs (its grey morphology was a third of a propagation step).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..errors import PeftExportError

PROJECTIONS = ("box", "mask", "points", "points_and_mask", "single_point")
_LOGIT = float(np.log((1 - 1e-3) / 1e-3))


def projection_prompts(projection: str) -> Tuple[bool, bool, bool, bool]:
    """(use box, use mask, use points, single point) of a projection mode."""
    table = {"mask": (True, True, False, False), "box": (True, False, False, False),
             "points": (False, False, True, False), "points_and_mask": (False, True, True, False),
             "single_point": (False, False, True, True)}
    if projection not in table:
        raise PeftExportError(f"projection: unknown {projection!r} (use {', '.join(PROJECTIONS)})")
    return table[projection]


def mask_extent(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of a non-empty mask's pixels, ends exclusive (row and column ``any``: no
    index list of every pixel, which a large object makes slow)."""
    rows, cols = np.flatnonzero(np.any(mask, axis=1)), np.flatnonzero(np.any(mask, axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def outer_boundary(mask: np.ndarray) -> np.ndarray:
    """Background pixels with a 4-connected object neighbour: ``find_boundaries(mask, mode="outer")``
    of a binary mask (nothing beyond the edge)."""
    fg = np.asarray(mask, bool)
    near = np.zeros_like(fg)
    near[1:] |= fg[:-1]
    near[:-1] |= fg[1:]
    near[:, 1:] |= fg[:, :-1]
    near[:, :-1] |= fg[:, 1:]
    return near & ~fg


def box_from_mask(mask: np.ndarray, box_extension: float = 0.0) -> np.ndarray:
    """The mask's XYXY box (int), extended by ``box_extension`` and clipped to the mask's shape."""
    y0, x0, y1, x1 = mask_extent(mask)
    if box_extension == 0:
        ey = ex = 0.0
    elif box_extension >= 1:
        ey = ex = float(box_extension)
    else:
        ey, ex = box_extension * (y1 - y0), box_extension * (x1 - x0)
    h, w = mask.shape
    box = np.array([max(x0 - ex, 0), max(y0 - ey, 0), min(x1 + ex, w), min(y1 + ey, h)], np.float64)
    return np.round(box).astype(int)


def points_from_mask(mask: np.ndarray, box_extension: float = 0.0, single_point: bool = False
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Positive points at the inner maxima of the distance to the boundary, negative ones at the
    outer maxima (inside the extended box): (N, 2) x, y and (N,) labels 1 / 0."""
    from bioimage_cpp.distance import distance_transform
    from bioimage_cpp.filters import gaussian_smoothing
    from skimage.feature import peak_local_max

    x0, y0, x1, y1 = box_from_mask(mask, box_extension)
    crop = np.asarray(mask[y0:y1, x0:x1]).astype(bool)
    boundary = outer_boundary(crop)
    dist = gaussian_smoothing(distance_transform(boundary == 0), sigma=1.0)
    inner = np.where(crop, dist, 0.0).astype(dist.dtype)
    offset = np.array([y0, x0])
    if single_point:
        yx = np.array(np.unravel_index(int(inner.argmax()), inner.shape)) + offset
        return yx[None, ::-1].astype(np.float64), np.ones(1, np.int64)
    outer = np.where(crop, 0.0, dist).astype(dist.dtype)
    pos = peak_local_max(inner, exclude_border=False, min_distance=3)
    neg = peak_local_max(outer, exclude_border=False, min_distance=5)
    yx = np.concatenate([pos, neg]).astype(np.float64) + offset
    labels = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    return yx[:, ::-1], labels


def logits_from_mask(mask: np.ndarray, low_res_size: int) -> np.ndarray:
    """The mask as the decoder's mask input (1, s, s): +-log(999) logits of the resized binary mask."""
    from ..runtime.preprocess import preprocess_shape, resize_float

    binary = (np.asarray(mask) == 1).astype(np.float32)
    h, w = binary.shape
    new = preprocess_shape(h, w, low_res_size)
    small = resize_float(binary, new) if new != (h, w) else binary
    padded = np.zeros((low_res_size, low_res_size), np.float32)
    padded[: new[0], : new[1]] = small
    return np.where(padded > 0.5, _LOGIT, -_LOGIT).astype(np.float32)[None]


def mask_prompts(mask: np.ndarray, projection: str, box_extension: float, low_res_size: int
                 ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """(points xy, point labels, box, mask input) a mask gives in ``projection`` mode (None: not used;
    an empty mask gives no points and no box)."""
    use_box, use_mask, use_points, single = projection_prompts(projection)
    has = bool(np.any(mask))
    points = labels = box = None
    if use_points and has:
        points, labels = points_from_mask(mask, box_extension, single)
    if use_box and has:
        box = box_from_mask(mask, box_extension)
    return points, labels, box, (logits_from_mask(mask, low_res_size) if use_mask else None)
