"""Prompts for one training patch: object choice, initial point/box, corrective points.

All randomness comes from the ``np.random.Generator`` passed in, which the loop seeds
per (seed, step, rank), so a resumed run draws exactly the prompts it would have drawn.
Points are (x, y) in patch pixels; boxes [x0, y0, x1, y1] with inclusive maxima, as
``data.prompts.box_from_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.prompts import box_from_mask


@dataclass
class ObjectBatch:
    """The objects of one patch chosen for a step and their initial prompts."""

    ids: np.ndarray  # (N,) object ids in the label patch
    masks: np.ndarray  # (N, H, W) bool
    points: np.ndarray  # (N, 1, 2) float32, one positive point per object
    boxes: np.ndarray  # (N, 4) float32


def choose_objects(label: np.ndarray, max_objects: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``max_objects`` object ids of ``label``, drawn without replacement, sorted."""
    ids = np.unique(label)
    ids = ids[ids > 0]
    if ids.size > max_objects:
        ids = np.sort(rng.choice(ids, size=max_objects, replace=False))
    return ids


def _random_pixel(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    flat = np.flatnonzero(region)
    if flat.size == 0:
        return None
    i = int(flat[int(rng.integers(flat.size))])
    y, x = divmod(i, region.shape[1])
    return x, y


def initial_prompts(label: np.ndarray, max_objects: int, rng: np.random.Generator) -> ObjectBatch:
    """Objects of a patch with one positive point (uniform in the object) and a box each."""
    ids = choose_objects(label, max_objects, rng)
    masks = np.stack([label == i for i in ids]) if ids.size else np.zeros((0,) + label.shape, bool)
    points = np.zeros((len(ids), 1, 2), np.float32)
    boxes = np.zeros((len(ids), 4), np.float32)
    for n, mask in enumerate(masks):
        points[n, 0] = _random_pixel(mask, rng)
        boxes[n] = box_from_mask(mask)
    return ObjectBatch(ids, masks, points, boxes)


def corrective_points(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One positive point from the missed object pixels and one negative point from the false
    positives of each object (micro-sam's sub-iterations), drawn uniformly in the error region.

    ``pred``, ``gt`` (N, H, W) bool. Returns coords (N, 2, 2) float32 and labels (N, 2) int64;
    a side without error gets the padding point (0, 0) / -1, which SAM ignores.
    """
    n = len(gt)
    coords = np.zeros((n, 2, 2), np.float32)
    labels = np.full((n, 2), -1, np.int64)
    for i in range(n):
        for j, (region, lab) in enumerate(((gt[i] & ~pred[i], 1), (pred[i] & ~gt[i], 0))):
            p = _random_pixel(region, rng)
            if p is not None:
                coords[i, j] = p
                labels[i, j] = lab
    return coords, labels
