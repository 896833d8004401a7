"""Connected components in numpy: 8-connected labels and amg.remove_small_regions (cv2 not needed).

Components are found on horizontal runs of pixels (``mask_runs.runs_of``): runs in
consecutive rows that overlap or touch diagonally are joined by a vectorised union-find.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..errors import PeftExportError
from .mask_runs import paint_runs, runs_of


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
    row, start, end = runs_of(mask)
    root = _run_components(row, start, end, w)
    roots, comp = np.unique(root, return_inverse=True)
    lengths = end - start
    sizes = np.bincount(comp, weights=lengths, minlength=len(roots)).astype(np.int64)
    labels = np.zeros(h * w, dtype=np.int32)
    paint_runs(labels, row * w + start, lengths, (comp + 1).astype(np.int32))
    return labels.reshape(h, w), sizes


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """amg.remove_small_regions: fill small holes ("holes") or drop small islands ("islands")."""
    if mode not in ("holes", "islands"):
        raise PeftExportError(f"remove_small_regions: mode must be 'holes' or 'islands', got '{mode}'")
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    correct_holes = mode == "holes"
    working = ~mask if correct_holes else mask
    row, start, end = runs_of(working)
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
    paint_runs(out, (row * w + start)[run_fill], lengths[run_fill], True)
    return out.reshape(h, w), True
