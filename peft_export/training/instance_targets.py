"""The instance decoder's training targets: per-object normalised distances, as micro-sam trains it.

micro-sam labels its AIS training data with torch-em's ``PerObjectDistanceTransform(distances=True,
boundary_distances=True, directed_distances=False, foreground=True, min_size=...)``. This is the
same transform in numpy + scipy. For a label image it returns three float32 channels:

* foreground: 1 inside objects, 0 outside;
* centre distance: per object, the Euclidean distance to the object's centre divided by its
  largest value in the object (0 at the centre, 1 at the farthest pixel);
* boundary distance: per object, (largest distance to the object's boundary - distance to the
  boundary), divided by its largest value (0 at the most central pixel, 1 on the boundary).

Outside objects both distances are 1. Objects are first split into 8-connected components
(each piece of an id is its own object), pieces under ``min_size`` pixels are dropped. The
centre is the centroid rounded to a pixel (numpy's round-half-to-even, as torch-em), or, when
that pixel lies outside the object, the pixel farthest from the boundary. Boundaries are the
objects' inner boundaries (pixels with a 4-neighbour of another label, ``find_boundaries``
mode "inner").
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

EPS = 1e-7  # torch-em's PerObjectDistanceTransform.eps
_EIGHT = np.ones((3, 3), dtype=bool)
_CROSS = ndimage.generate_binary_structure(2, 1)


def split_components(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Each 8-connected piece of each id as its own object, pieces under ``min_size`` pixels removed (int32)."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.int32)
    next_id = 1
    for value, box in enumerate(ndimage.find_objects(labels.astype(np.int64)), start=0):
        if box is None:
            continue
        obj_id = value + 1
        pieces, n = ndimage.label(labels[box] == obj_id, structure=_EIGHT)
        if n == 0:
            continue
        sizes = np.bincount(pieces.ravel(), minlength=n + 1)
        region = out[box]
        for k in range(1, n + 1):
            if sizes[k] >= max(min_size, 1):
                region[pieces == k] = next_id
                next_id += 1
    return out


def inner_boundaries(labels: np.ndarray) -> np.ndarray:
    """skimage's ``find_boundaries(labels, mode="inner")``: object pixels with a 4-neighbour of another value."""
    dilated = ndimage.grey_dilation(labels, footprint=_CROSS, mode="reflect")
    eroded = ndimage.grey_erosion(labels, footprint=_CROSS, mode="reflect")
    return (dilated != eroded) & (labels != 0)


def _object_distances(mask: np.ndarray, boundary: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    """(2, h, w) normalised centre and boundary distances of one object inside its bounding box."""
    if boundary.any():
        to_boundary = ndimage.distance_transform_edt(~boundary)
    else:  # an object that fills its whole box without touching anything: no boundary inside it
        to_boundary = np.zeros(mask.shape)
    to_boundary[~mask] = 0
    deepest = np.unravel_index(int(np.argmax(to_boundary)), to_boundary.shape)
    if not mask[centre]:
        centre = deepest
    yy, xx = np.indices(mask.shape)
    dist = np.stack([np.hypot(yy - centre[0], xx - centre[1]), to_boundary[deepest] - to_boundary])
    dist[:, ~mask] = 0
    dist /= np.abs(dist).reshape(2, -1).max(axis=1)[:, None, None] + EPS
    return dist


def distance_targets(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """(3, H, W) float32: foreground, centre distance, boundary distance (see the module doc)."""
    labels = split_components(labels, min_size)
    boundaries = inner_boundaries(labels)
    out = np.ones((3,) + labels.shape, dtype=np.float32)
    out[0] = labels > 0
    for obj_id, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == obj_id
        ys, xs = np.nonzero(mask)
        # Rounded in image coordinates, as torch-em (half-to-even rounding depends on the offset).
        centre = (int(np.round(ys.mean() + box[0].start)) - box[0].start,
                  int(np.round(xs.mean() + box[1].start)) - box[1].start)
        dist = _object_distances(mask, boundaries[box], centre)
        out[1][box][mask] = dist[0][mask]
        out[2][box][mask] = dist[1][mask]
    return out
