"""Per-object helpers on instance label images (0 is background)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def object_sizes(label: np.ndarray) -> dict[int, int]:
    """Pixel count of every object id (> 0) present in ``label``."""
    ids, counts = np.unique(label[label > 0], return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def objects_in_label(label: np.ndarray, min_size: int = 0) -> list[int]:
    """Sorted ids of the objects with at least ``min_size`` pixels."""
    return [i for i, size in object_sizes(label).items() if size >= min_size]


def remove_small_objects(label: np.ndarray, min_size: int) -> np.ndarray:
    """Copy of ``label`` with objects under ``min_size`` pixels set to 0."""
    out = np.array(label, copy=True)
    if min_size <= 0:
        return out
    ids, inverse, counts = np.unique(out, return_inverse=True, return_counts=True)
    small = (counts < min_size) & (ids > 0)
    out[small[inverse.reshape(out.shape)]] = 0
    return out


def relabel_consecutive(label: np.ndarray) -> np.ndarray:
    """Renumber objects 1..n in order of their old ids; background stays 0. Returns int32."""
    ids, inverse = np.unique(label, return_inverse=True)
    new = np.arange(len(ids), dtype=np.int32)
    if len(ids) and ids[0] != 0:
        new += 1
    return new[inverse.reshape(label.shape)]


def semantic_to_instance(label: np.ndarray) -> np.ndarray:
    """Split each class value (> 0) of a semantic/binary mask into connected components.

    Connectivity is scipy's default (4-neighbours in 2D), so diagonally touching
    blobs stay separate objects. Ids are consecutive, int32.
    """
    out = np.zeros(label.shape, dtype=np.int32)
    offset = 0
    for value in np.unique(label):
        if value <= 0:
            continue
        components, n = ndimage.label(label == value)
        out[components > 0] = components[components > 0] + offset
        offset += n
    return out


def mask_of(label: np.ndarray, object_id: int) -> np.ndarray:
    """Boolean mask of one object."""
    return label == object_id
