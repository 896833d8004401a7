"""Segmentation metrics: Dice and IoU of binary masks, instance matching and mSA.

numpy (and scipy's linear_sum_assignment for matching) only. Conventions follow
the paper's reference evaluation (micro-sam, which uses elf's
``mean_segmentation_accuracy``): label 0 is background, every other value is one
object; a predicted object and a ground-truth object match when their IoU is at
least the threshold, with an optimal one-to-one assignment; segmentation accuracy
is TP / (TP + FP + FN); mSA averages it over the IoU thresholds 0.5, 0.55, ..., 0.95.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_THRESHOLDS = np.arange(0.5, 1.0, 0.05)


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: prediction {a.shape} vs ground truth {b.shape}")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks, 2|P∩G| / (|P| + |G|); both empty -> 1.0 (nothing to find, nothing found)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_same_shape(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU (Jaccard) of two binary masks, |P∩G| / |P∪G|; both empty -> 1.0."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_same_shape(pred, gt)
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, gt).sum()) / union


def _dense_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map label values to 0..n-1 (sorted), returning (ids present, dense image).

    For the usual small non-negative ids a lookup table is O(pixels); np.unique
    (a sort) is only the fallback for negative or very large ids.
    """
    flat = labels.ravel()
    if flat.size and np.issubdtype(flat.dtype, np.integer):
        lo, hi = int(flat.min()), int(flat.max())
        if lo >= 0 and hi <= max(4 * flat.size, 1 << 16):
            present = np.flatnonzero(np.bincount(flat, minlength=hi + 1))
            lut = np.zeros(hi + 1, dtype=np.int64)
            lut[present] = np.arange(present.size)
            return present, lut[flat]
    values, inverse = np.unique(flat, return_inverse=True)
    return values, inverse.ravel().astype(np.int64)


def iou_matrix(pred_labels: np.ndarray, gt_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every predicted object and every ground-truth object (background 0 excluded).

    Returns ``(iou, pred_ids, gt_ids)`` with ``iou`` of shape (n_pred, n_gt). Built from
    one contingency table (np.bincount over pairs of dense ids), not per-object loops.
    """
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    _check_same_shape(pred_labels, gt_labels)
    p_vals, p_dense = _dense_ids(pred_labels)
    g_vals, g_dense = _dense_ids(gt_labels)
    n_p, n_g = p_vals.size, g_vals.size
    if n_p * n_g <= (1 << 26):
        table = np.bincount(p_dense * n_g + g_dense, minlength=n_p * n_g).reshape(n_p, n_g)
    else:
        # Too many id pairs for a dense bincount: count only the pairs that occur.
        codes, counts = np.unique(p_dense * n_g + g_dense, return_counts=True)
        table = np.zeros((n_p, n_g), dtype=np.int64)
        table[codes // n_g, codes % n_g] = counts
    area_p = table.sum(axis=1)
    area_g = table.sum(axis=0)
    keep_p = p_vals != 0
    keep_g = g_vals != 0
    inter = table[keep_p][:, keep_g].astype(np.float64)
    union = area_p[keep_p][:, None] + area_g[keep_g][None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(union > 0, inter / union, 0.0)
    return scores, p_vals[keep_p], g_vals[keep_g]


def _count_tp(scores: np.ndarray, thresh: float) -> int:
    if scores.size == 0:
        return 0
    hits = scores >= thresh
    if not hits.any():
        return 0
    # Maximise the number of matches at this threshold first, IoU only as a tie
    # break (the stardist / elf cost); for thresh > 0.5 matches are unique anyway.
    n_min = min(scores.shape)
    cost = -hits.astype(np.float64) - scores / (2.0 * n_min)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    return int(hits[rows, cols].sum())


def matching(pred_labels: np.ndarray, gt_labels: np.ndarray, thresh: float = 0.5) -> dict:
    """Optimal one-to-one matching of predicted to ground-truth objects at IoU >= ``thresh``.

    Returns ``{"tp", "fp", "fn", "n_pred", "n_gt"}`` (ints).
    """
    scores, p_ids, g_ids = iou_matrix(pred_labels, gt_labels)
    tp = _count_tp(scores, thresh)
    return {"tp": tp, "fp": int(p_ids.size - tp), "fn": int(g_ids.size - tp),
            "n_pred": int(p_ids.size), "n_gt": int(g_ids.size)}


def segmentation_accuracy(pred_labels: np.ndarray, gt_labels: np.ndarray, thresh: float = 0.5) -> float:
    """TP / (TP + FP + FN) at one IoU threshold; no objects in either -> 1.0."""
    m = matching(pred_labels, gt_labels, thresh)
    denom = m["tp"] + m["fp"] + m["fn"]
    return 1.0 if denom == 0 else m["tp"] / denom


def mean_segmentation_accuracy(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
) -> tuple[float, dict[float, float]]:
    """mSA: segmentation accuracy averaged over IoU thresholds (default 0.5:0.05:0.95).

    Returns ``(msa, {threshold rounded to 4 decimals: SA})``. The IoU matrix is
    computed once and reused for every threshold.
    """
    scores, p_ids, g_ids = iou_matrix(pred_labels, gt_labels)
    per = {}
    for t in thresholds:
        tp = _count_tp(scores, float(t))
        denom = p_ids.size + g_ids.size - tp  # tp + fp + fn
        per[round(float(t), 4)] = 1.0 if denom == 0 else tp / denom
    msa = float(np.mean(list(per.values()))) if per else float("nan")
    return msa, per
