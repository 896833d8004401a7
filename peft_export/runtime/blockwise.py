"""AIS post-processing block by block: the seeded watershed of ``runtime.instances`` on maps too
large to hold at once, with objects that cross block borders coming out whole.

Four passes, each a function of one block (so the in-process loop and Dask tasks run the same
code; ``maps``, ``seeds`` and ``labels`` are any arrays that slice: numpy, zarr, a memmap):

1. ``seed_block``: smooth the maps of the block plus ``halo`` (the halo covers the Gaussian's
   radius, so the smoothing equals the whole image's), find the seeds, label them (8-connected)
   in the block's inner area and store them with ids unique per block (``block_offset``);
2. ``merge_seeds``: seeds that touch across a block face (8-connected, corners included) are
   one seed: connected components over the touching pairs give each merged seed one id, numbered
   in the order of its smallest block id (one block: ids in raster order, as untiled);
3. ``watershed_block``: the seeded watershed of the block plus a context with the merged ids,
   its inner area written out, its pixel counts returned. The context is derived from the
   objects: it starts at ``halo`` and doubles until every object with pixels in the block lies
   inside the window, clear of the window's edge by the smoothing's reach, and no foreground of
   the block is left unlabelled for want of a seed beyond the window (``objects_inside``); at
   most ``max_context`` (default ``MAX_CONTEXT``, or the block's size if larger);
4. ``relabel_block``: objects under ``min_size`` removed and ids made consecutive, as
   ``filter_small_objects`` does for the whole image.

With one block this is ``instances_from_maps`` exactly. With several, a block's window holds
the whole of every object it contributes to, with the same smoothed values and seeds as the
whole image, so its labels are the whole image's; only a block that reached ``max_context``
(an object wider than about a block) may differ, and the pass says so (``whole`` False).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .instances import gaussian_smoothing, require_ais_packages

Window = Tuple[int, int, int, int]  # y0, y1, x0, x1
# px: the most context a block's watershed grows to: objects up to about this size come out
# whole. A 1024-px block's window is then 2048 px square (~0.25 GB of maps and scratch; at 1024 px
# it would be 3072 px square and more than twice that).
MAX_CONTEXT = 512


def blocks(shape_hw: Tuple[int, int], block: int) -> List[Window]:
    """Row-major inner blocks of ``block`` x ``block`` pixels covering the image."""
    h, w = shape_hw
    return [(y, min(y + block, h), x, min(x + block, w)) for y in range(0, h, block) for x in range(0, w, block)]


def min_halo(params: Dict[str, Any]) -> int:
    """The halo the smoothing needs (the Gaussian's radius) plus one pixel."""
    sigma = max(float(params["foreground_smoothing"]), float(params["distance_smoothing"]))
    return max(int(math.ceil(3.0 * sigma)), 1) + 1


def _outer(inner: Window, halo: int, shape_hw: Tuple[int, int]) -> Window:
    y0, y1, x0, x1 = inner
    return max(0, y0 - halo), min(shape_hw[0], y1 + halo), max(0, x0 - halo), min(shape_hw[1], x1 + halo)


def _smoothed(maps: Any, outer: Window, params: Dict[str, Any]):
    """(foreground mask, seed mask, smoothed boundary distances) of the window ``outer``."""
    ndimage, _ = require_ais_packages()
    y0, y1, x0, x1 = outer
    fg, cdist, bdist = (np.asarray(maps[c, y0:y1, x0:x1], np.float32) for c in range(3))
    if params["foreground_smoothing"] > 0:
        fg = gaussian_smoothing(fg, params["foreground_smoothing"], ndimage)
    if params["distance_smoothing"] > 0:
        cdist = gaussian_smoothing(cdist, params["distance_smoothing"], ndimage)
        bdist = gaussian_smoothing(bdist, params["distance_smoothing"], ndimage)
    fg_mask = fg > params["foreground_threshold"]
    seeds = (cdist < params["center_distance_threshold"]) & (bdist < params["boundary_distance_threshold"]) & fg_mask
    return fg_mask, seeds, bdist


def _inner_of(inner: Window, outer: Window) -> Tuple[slice, slice]:
    return slice(inner[0] - outer[0], inner[1] - outer[0]), slice(inner[2] - outer[2], inner[3] - outer[2])


def block_offset(index: int, block: int) -> int:
    """Seed ids of block ``index`` start above this (a block holds fewer than block² seeds)."""
    return index * block * block


def seed_block(maps: Any, seeds: Any, inner: Window, index: int, block: int, halo: int,
               params: Dict[str, Any]) -> int:
    """Pass 1: write the block's seeds (ids ``block_offset + 1..n``) into ``seeds``; return n."""
    ndimage, _ = require_ais_packages()
    shape = tuple(maps.shape[1:])
    outer = _outer(inner, max(halo, min_halo(params)), shape)
    _, seed_mask, _ = _smoothed(maps, outer, params)
    local, n = ndimage.label(seed_mask[_inner_of(inner, outer)], structure=np.ones((3, 3), bool))
    out = local.astype(np.int64)
    out[local > 0] += block_offset(index, block)
    seeds[inner[0]:inner[1], inner[2]:inner[3]] = out
    return int(n)


def _face_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(K, 2) ids touching across a face: a[i] with b[i-1], b[i], b[i+1] (8-connectivity)."""
    pairs = []
    for d in (-1, 0, 1):
        aa = a[max(0, -d): len(a) - max(0, d)]
        bb = b[max(0, d): len(b) - max(0, -d)]
        both = (aa > 0) & (bb > 0) & (aa != bb)
        pairs.append(np.stack([aa[both], bb[both]], axis=1))
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)


def face_pairs(seeds: Any, shape_hw: Tuple[int, int], block: int) -> np.ndarray:
    """All seed-id pairs touching across the faces between blocks (whole rows/columns of faces)."""
    h, w = shape_hw
    found = [np.zeros((0, 2), np.int64)]
    for x in range(block, w, block):
        found.append(_face_pairs(np.asarray(seeds[:, x - 1]), np.asarray(seeds[:, x])))
    for y in range(block, h, block):
        found.append(_face_pairs(np.asarray(seeds[y - 1, :]), np.asarray(seeds[y, :])))
    return np.concatenate(found).astype(np.int64)


def merge_seeds(counts: Sequence[int], block: int, pairs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pass 2: (sorted block ids, merged id of each), merged ids 1..m by their smallest block id."""
    ids = np.concatenate([block_offset(i, block) + np.arange(1, n + 1, dtype=np.int64)
                          for i, n in enumerate(counts)] or [np.zeros(0, np.int64)])
    if len(ids) == 0:
        return ids, ids.copy()
    if len(pairs) == 0:
        return ids, np.arange(1, len(ids) + 1, dtype=np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = np.searchsorted(ids, pairs[:, 0]), np.searchsorted(ids, pairs[:, 1])
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(ids), len(ids)))
    _, comp = connected_components(graph, directed=False)  # numbered by first (smallest) node
    return ids, comp.astype(np.int64) + 1


def _relabel(values: np.ndarray, keys: np.ndarray, new: np.ndarray) -> np.ndarray:
    out = np.zeros(values.shape, np.int64)
    nz = values > 0
    if nz.any():
        out[nz] = new[np.searchsorted(keys, values[nz])]
    return out


def _edge_ring(outer: Window, shape_hw: Tuple[int, int], width: int) -> np.ndarray:
    """The window's pixels within ``width`` of an edge that is not the image's edge."""
    y0, y1, x0, x1 = outer
    ring = np.zeros((y1 - y0, x1 - x0), bool)
    if y0 > 0:
        ring[:width] = True
    if y1 < shape_hw[0]:
        ring[-width:] = True
    if x0 > 0:
        ring[:, :width] = True
    if x1 < shape_hw[1]:
        ring[:, -width:] = True
    return ring


def objects_inside(lab: np.ndarray, fg_mask: np.ndarray, inner: Window, outer: Window, shape_hw: Tuple[int, int],
                   margin: int) -> bool:
    """Whether the window's watershed ``lab`` is final in the block: no object with pixels in the
    block reaches the window's edge ring (``margin`` wide: there the smoothing lacks context, and
    beyond it the object may go on), and no unlabelled foreground of the block reaches it (its
    seed may lie outside)."""
    ndimage, _ = require_ais_packages()
    ring = _edge_ring(outer, shape_hw, margin)
    if not ring.any():
        return True  # the window is the whole image
    ins = _inner_of(inner, outer)
    in_block = np.unique(lab[ins])
    if np.isin(np.unique(lab[ring]), in_block[in_block > 0]).any():
        return False
    orphans = fg_mask & (lab == 0)
    if not orphans[ins].any():
        return True
    comps, _ = ndimage.label(orphans)  # the watershed floods 4-connected, as this labels
    reach = np.unique(comps[ins])
    return not np.isin(np.unique(comps[ring]), reach[reach > 0]).any()


def watershed_block(maps: Any, seeds: Any, labels: Any, inner: Window, halo: int, params: Dict[str, Any],
                    keys: np.ndarray, merged: np.ndarray, max_context: Optional[int] = None
                    ) -> Tuple[np.ndarray, int, bool]:
    """Pass 3: watershed of the block plus a context that grows from ``halo`` until the objects
    fit (module docstring) with merged seed ids; write the inner area into ``labels``; return
    ((2, K): the ids in the block and their pixel counts, the context used, whether the objects
    fit within ``max_context``)."""
    _, watershed = require_ais_packages()
    shape = tuple(maps.shape[1:])
    margin = min_halo(params)
    context = max(int(halo), 2 * margin)
    limit = max(context, int(max_context or max(MAX_CONTEXT, inner[1] - inner[0], inner[3] - inner[2])))
    while True:
        outer = _outer(inner, context, shape)
        fg_mask, _, bdist = _smoothed(maps, outer, params)
        y0, y1, x0, x1 = outer
        markers = _relabel(np.asarray(seeds[y0:y1, x0:x1]), keys, merged)
        lab = np.asarray(watershed(bdist, markers=markers, mask=fg_mask))
        whole = objects_inside(lab, fg_mask, inner, outer, shape, margin)
        if whole or context >= limit:
            break
        context = min(2 * context, limit)
    lab = lab[_inner_of(inner, outer)]
    labels[inner[0]:inner[1], inner[2]:inner[3]] = lab.astype(labels.dtype)
    ids, counts = np.unique(lab[lab > 0].astype(np.int64), return_counts=True)
    return np.stack([ids, counts]), context, whole  # sparse: a block holds few of the image's objects


def size_filter(counts: Sequence[np.ndarray], min_size: int) -> np.ndarray:
    """New id of each merged id (index) after dropping objects under ``min_size`` pixels;
    ``counts``: each block's (2, K) ids and pixel counts."""
    n = max((int(c[0].max()) + 1 for c in counts if np.size(c)), default=1)
    sizes = np.zeros(n, np.int64)
    for c in counts:
        c = np.asarray(c, np.int64).reshape(2, -1)
        np.add.at(sizes, c[0], c[1])
    keep = sizes >= max(int(min_size), 1)
    keep[0] = False
    new_ids = np.zeros(n, np.int64)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids


def relabel_block(labels: Any, inner: Window, new_ids: np.ndarray) -> int:
    """Pass 4: renumber the block's labels in place; return its largest id."""
    y0, y1, x0, x1 = inner
    lab = new_ids[np.asarray(labels[y0:y1, x0:x1]).astype(np.int64)]
    labels[y0:y1, x0:x1] = lab.astype(labels.dtype)
    return int(lab.max()) if lab.size else 0


def instances_blockwise(maps: Any, params: Dict[str, Any], block: int = 1024, halo: int = 64,
                        seeds: Any = None, labels: Any = None) -> Any:
    """Instance labels from (3, H, W) maps, block by block (in this process). ``seeds`` (int64)
    and ``labels`` (int32 or uint32) are H x W arrays to work in (default: numpy); returns ``labels``."""
    shape = tuple(maps.shape[1:])
    seeds = np.zeros(shape, np.int64) if seeds is None else seeds
    labels = np.zeros(shape, np.int32) if labels is None else labels
    grid = blocks(shape, block)
    counts = [seed_block(maps, seeds, win, i, block, halo, params) for i, win in enumerate(grid)]
    keys, merged = merge_seeds(counts, block, face_pairs(seeds, shape, block))
    sizes = [watershed_block(maps, seeds, labels, win, halo, params, keys, merged)[0] for win in grid]
    new_ids = size_filter(sizes, int(params["min_size"]))
    for win in grid:
        relabel_block(labels, win, new_ids)
    return labels
