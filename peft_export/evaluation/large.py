"""mSA of label images too large to hold at once (zarr, memmap): the pred x gt overlap counts are
gathered block by block as sparse pairs, then matched as ``metrics.mean_segmentation_accuracy``
matches (the same optimal one-to-one matching, on only the objects that reach a threshold)."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import numpy as np

from ..errors import PeftExportError
from .metrics import DEFAULT_THRESHOLDS, _count_tp


def overlap_counts(pred: Any, gt: Any, block: int = 2048) -> Tuple[np.ndarray, np.ndarray, Dict[int, int], Dict[int, int]]:
    """Sparse contingency of two H x W label arrays read ``block`` rows/cols at a time:
    (pairs (K, 2) of non-zero ids, their pixel counts (K,), area per pred id, area per gt id)."""
    if tuple(pred.shape) != tuple(gt.shape) or len(pred.shape) != 2:
        raise PeftExportError(f"labels: prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ "
                              "(both must be H x W label images of one size)")
    pairs: Dict[Tuple[int, int], int] = {}
    area_p: Dict[int, int] = {}
    area_g: Dict[int, int] = {}
    h, w = pred.shape
    for y in range(0, h, block):
        for x in range(0, w, block):
            p = np.asarray(pred[y:y + block, x:x + block]).astype(np.int64).ravel()
            g = np.asarray(gt[y:y + block, x:x + block]).astype(np.int64).ravel()
            for ids, area in ((p, area_p), (g, area_g)):
                vals, counts = np.unique(ids[ids > 0], return_counts=True)
                for v, c in zip(vals.tolist(), counts.tolist()):
                    area[v] = area.get(v, 0) + c
            both = (p > 0) & (g > 0)
            if both.any():
                codes, counts = np.unique(np.stack([p[both], g[both]], axis=1), axis=0, return_counts=True)
                for (a, b), c in zip(codes.tolist(), counts.tolist()):
                    pairs[(a, b)] = pairs.get((a, b), 0) + c
    keys = np.array(list(pairs), np.int64).reshape(-1, 2)
    return keys, np.array(list(pairs.values()), np.int64), area_p, area_g


def mean_segmentation_accuracy_large(pred: Any, gt: Any, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                                     block: int = 2048) -> Tuple[float, Dict[float, float]]:
    """``mean_segmentation_accuracy`` of label arrays of any size (numpy, zarr, memmap): equal results."""
    keys, inter, area_p, area_g = overlap_counts(pred, gt, block)
    n_p, n_g = len(area_p), len(area_g)
    if len(keys):
        union = np.array([area_p[a] + area_g[b] for a, b in keys.tolist()], np.float64) - inter
        scores = inter / union
    else:
        scores = np.zeros(0)
    per = {}
    for t in thresholds:
        hit = scores >= float(t)
        tp = 0
        if hit.any():  # the optimal matching among the objects with a pair at this threshold only
            rows, r_idx = np.unique(keys[hit, 0], return_inverse=True)
            cols, c_idx = np.unique(keys[hit, 1], return_inverse=True)
            sub = np.zeros((len(rows), len(cols)))
            sub[r_idx, c_idx] = scores[hit]
            tp = _count_tp(sub, float(t))
        denom = n_p + n_g - tp
        per[round(float(t), 4)] = 1.0 if denom == 0 else tp / denom
    return (float(np.mean(list(per.values()))) if per else float("nan")), per
