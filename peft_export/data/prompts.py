"""Prompt sampling from masks (numpy), shared by training and evaluation.

Conventions follow SAM: a point is (x, y) with x the column and y the row, in pixels of
the image the mask belongs to; labels 1 positive, 0 negative, -1 padding. Boxes are
[x0, y0, x1, y1] with inclusive maxima (x1 = last column, y1 = last row), as micro-sam
computes them. Distances treat the image border as object boundary, so points stay
away from cut edges too.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PADDING_POINT = (0, 0, -1)


def box_from_mask(mask: np.ndarray, margin: int = 0) -> np.ndarray:
    """float32 [x0, y0, x1, y1] of the mask's bounding box, grown by ``margin`` and clipped."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("box_from_mask: empty mask")
    h, w = mask.shape
    return np.array([max(cols[0] - margin, 0), max(rows[0] - margin, 0),
                     min(cols[-1] + margin, w - 1), min(rows[-1] + margin, h - 1)], dtype=np.float32)


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest non-mask pixel or image border."""
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def sample_positive_point(mask: np.ndarray, rng: np.random.Generator, interior: bool = True) -> tuple[int, int]:
    """A point (x, y) inside the object.

    With ``interior`` the point is drawn uniformly from the object's interior band: the
    pixels whose distance to the boundary is at least half the object's largest distance
    (a thin object still gets its middle line). Without it, from all object pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("sample_positive_point: empty mask")
    if interior:
        dist = _inner_distance(mask)
        ys, xs = np.nonzero(dist >= 0.5 * dist.max())
    else:
        ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(ys)))
    return int(xs[i]), int(ys[i])


def _farthest_from_boundary(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    dist = _inner_distance(region)
    ys, xs = np.nonzero(dist == dist.max())
    i = int(rng.integers(len(ys))) if len(ys) > 1 else 0
    return int(xs[i]), int(ys[i])


def _components(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    comps, n = ndimage.label(region)
    sizes = np.bincount(comps.ravel(), minlength=n + 1)
    sizes[0] = 0
    return comps, sizes


def corrective_point(pred_mask: np.ndarray, gt_mask: np.ndarray, rng: np.random.Generator,
                     kind: str = "largest") -> tuple[int, int, int] | None:
    """A corrective click (x, y, label) from the largest error region, or None without error.

    Error regions are the connected components of the false negatives (gt and not pred,
    label 1) and of the false positives (pred and not gt, label 0). ``kind`` "largest"
    takes the largest of all (ties broken by ``rng``), "positive" / "negative" only the
    largest false-negative / false-positive component. The point is the pixel of the
    region farthest from its boundary (distance transform), ties broken by ``rng``.
    """
    if kind not in ("largest", "positive", "negative"):
        raise ValueError(f"corrective_point: unknown kind {kind!r}")
    pred = np.asarray(pred_mask, dtype=bool)
    gt = np.asarray(gt_mask, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"corrective_point: shapes differ {pred.shape} vs {gt.shape}")
    regions = []
    if kind in ("largest", "positive"):
        regions.append((1, gt & ~pred))
    if kind in ("largest", "negative"):
        regions.append((0, pred & ~gt))
    candidates = []  # (size, label, components, component id)
    for label, region in regions:
        comps, sizes = _components(region)
        if sizes.max(initial=0) > 0:
            candidates += [(int(sizes[c]), label, comps, c) for c in np.flatnonzero(sizes == sizes.max())]
    if not candidates:
        return None
    best = max(c[0] for c in candidates)
    candidates = [c for c in candidates if c[0] == best]
    pick = int(rng.integers(len(candidates))) if len(candidates) > 1 else 0
    _, label, comps, cid = candidates[pick]
    x, y = _farthest_from_boundary(comps == cid, rng)
    return x, y, label


def corrective_points(pred_mask: np.ndarray, gt_mask: np.ndarray,
                      rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """One positive and one negative corrective click (micro-sam's iterative prompting).

    Always two entries so that a batch keeps a fixed number of points: a side without
    error gets the padding point (0, 0, -1), which SAM's prompt encoder ignores.
    """
    pos = corrective_point(pred_mask, gt_mask, rng, "positive")
    neg = corrective_point(pred_mask, gt_mask, rng, "negative")
    return [pos or PADDING_POINT, neg or PADDING_POINT]
