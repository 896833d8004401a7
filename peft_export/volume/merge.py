"""Per-plane instance labels merged into 3D objects (micro-sam's
``multi_dimensional_segmentation.merge_instance_segmentation_3d``), plane pair by plane pair.

1. ``gap_closing`` (optional): a binary closing along z only (``gap_closing`` iterations) fills
   objects missing on a few planes; on each plane away from the first / last ``gap_closing``
   ones, the closed foreground's connected components replace the plane's objects, unless one
   component covers several of them (two objects the closing would glue together keep theirs);
2. graph: one node per object of every plane (ids unique over the stack), one edge per pair of
   objects on consecutive planes that overlap, weighted by the share of the lower object's
   pixels inside the upper one (elf's ``compute_edges_from_overlap``);
3. multicut (bioimage-cpp's decomposer, Kernighan-Lin inside): costs log((1 - p) / p) + log((1 -
   beta) / beta) of the overlap p (clipped to [0.001, 0.999]), the solver given 1 - costs;
   ``beta`` 0.5 (more: more cuts); overlaps with background never form edges (``with_background``:
   edges to label 0 would be maximally repulsive, -8, as micro-sam sets them);
4. ``min_z_extent`` (optional): objects spanning fewer planes are removed. Ids are renumbered 1..n.

Every step reads one or two planes at a time (and yx blocks through all planes for the closing),
so the same functions merge a zarr stack larger than memory (``volume.slabs``).

Two of micro-sam 1.8.14's corner cases are not copied: its ``beta`` never reaches the costs (it is
passed where bioimage-cpp ignores it: its merge always uses 0.5), and a plane without background
loses its smallest id from the graph; here ``beta`` is used and every object is a node.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import PeftExportError

MERGE_DEFAULTS: Dict[str, Any] = {"beta": 0.5, "with_background": True, "gap_closing": None, "min_z_extent": None}
CLOSING_BLOCK = 256  # yx block (px) of the closing along z


def require_bioimage_cpp() -> Any:
    try:
        import bioimage_cpp
    except ImportError:
        raise PeftExportError("3D merge: bioimage-cpp is not installed; pip install 'peftexport[volume]'") from None
    return bioimage_cpp


def check_merge_options(beta: float = 0.5, gap_closing: Optional[int] = None, min_z_extent: Optional[int] = None
                        ) -> None:
    if not 0.0 < float(beta) < 1.0:
        raise PeftExportError(f"beta: must be between 0 and 1 (exclusive), got {beta}")
    for name, v in (("gap_closing", gap_closing), ("min_z_extent", min_z_extent)):
        if v is not None and (int(v) != v or v < 0):
            raise PeftExportError(f"{name}: must be a whole number >= 0, got {v}")


def plane_edges(lower: np.ndarray, upper: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Edges between the objects of two consecutive planes: (K, 2) (lower id, upper id) uint64 and
    the share of the lower object's pixels that lie in the upper one (K,)."""
    a = np.asarray(lower).ravel().astype(np.uint64)
    b = np.asarray(upper).ravel().astype(np.uint64)
    inside = a > 0
    ids, sizes = np.unique(a[inside], return_counts=True)
    both = inside & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.uint64), np.zeros(0)
    pairs, counts = np.unique(np.stack([a[both], b[both]], axis=1), axis=0, return_counts=True)
    return pairs.astype(np.uint64), counts / sizes[np.searchsorted(ids, pairs[:, 0])]


def solve_merge(n_nodes: int, uv: np.ndarray, overlap: np.ndarray, beta: float = 0.5,
                with_background: bool = True) -> np.ndarray:
    """The multicut over the overlap graph: a new label per node (node 0, background, stays 0)."""
    bic = require_bioimage_cpp()
    if len(uv) == 0:
        return np.arange(n_nodes, dtype=np.uint64)
    p = (0.999 - 0.001) * np.asarray(overlap, np.float64) + 0.001
    costs = np.log((1.0 - p) / p) + np.log((1.0 - beta) / beta)
    if with_background:
        costs[(uv == 0).any(axis=1)] = -8.0
    graph = bic.graph.UndirectedGraph(int(n_nodes))
    graph.insert_edges(np.ascontiguousarray(uv, np.uint64))
    mc = bic.graph.multicut
    solver = mc.MulticutDecomposer(sub_solver=mc.KernighanLinMulticut(), fallthrough_solver=mc.KernighanLinMulticut(),
                                   number_of_threads=1)
    labels = np.asarray(solver.optimize(mc.MulticutObjective(graph, 1.0 - costs)), np.uint64)
    if labels[0] != 0:  # background's component first: swap its label with 0
        zero = labels == 0
        labels[labels == labels[0]], labels[zero] = 0, labels[0]
    return labels


def close_along_z(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary closing of a Z x h x w mask along z only (``iterations`` times); yx blocks of a stack
    close independently, so a volume is closed block by block through all its planes."""
    from scipy.ndimage import binary_closing

    structure = np.zeros((3, 1, 1), bool)
    structure[:, 0, 0] = True
    return binary_closing(np.asarray(mask, bool), structure=structure, iterations=int(iterations))


def closed_plane(labels: np.ndarray, closed: np.ndarray, offset: int) -> Tuple[np.ndarray, int]:
    """One plane after the closing: components of the closed foreground replace the plane's objects
    (those covering several objects keep the objects); ids from ``offset``; returns (plane, next offset)."""
    from bioimage_cpp.segmentation import label, relabel_sequential

    seg = np.asarray(labels)
    comps = label(np.asarray(closed))
    n = int(comps.max())
    out = np.zeros_like(seg)
    if n:
        both = (comps > 0) & (seg > 0)
        pairs = np.unique(np.stack([comps[both], seg[both]], axis=1), axis=0) if both.any() else np.zeros((0, 2), int)
        per_comp = np.bincount(pairs[:, 0].astype(np.int64), minlength=n + 1)
        glued = per_comp > 1  # components that would join several of the plane's objects
        keep_closed = comps > 0
        keep_closed &= ~glued[comps]
        out[keep_closed] = comps[keep_closed]
        kept_ids = pairs[glued[pairs[:, 0].astype(np.int64)], 1]
        if len(kept_ids):
            mask = np.isin(seg, kept_ids)
            out[mask] = relabel_sequential(seg[mask], offset=int(out.max()) + 1)[0]
    out, _, _ = relabel_sequential(out, offset=offset)
    top = int(out.max())
    return out, (top + 1 if top > 0 else offset)


def _offset_plane(seg: np.ndarray, offset: int) -> Tuple[np.ndarray, int]:
    from bioimage_cpp.segmentation import relabel_sequential

    out, _, _ = relabel_sequential(np.asarray(seg), offset=offset)
    top = int(out.max())
    return out, (top + 1 if top > 0 else offset)


def merge_instance_segmentation_3d(slice_segmentation: np.ndarray, beta: float = 0.5, with_background: bool = True,
                                   gap_closing: Optional[int] = None, min_z_extent: Optional[int] = None
                                   ) -> np.ndarray:
    """Stacked per-plane instance labels (Z x H x W; ids unique over the stack) -> 3D instance
    labels (uint32, ids 1..n). See the module docstring for the steps."""
    check_merge_options(beta, gap_closing, min_z_extent)
    require_bioimage_cpp()
    seg = np.asarray(slice_segmentation)
    if seg.ndim != 3:
        raise PeftExportError(f"slice_segmentation: expected Z x H x W, got shape {seg.shape}")
    if seg.size and seg.min() < 0:
        raise PeftExportError("slice_segmentation: negative labels")
    seg = seg.astype(np.uint64)
    if gap_closing:
        seg = _close_in_memory(seg, int(gap_closing))
    edges = [plane_edges(seg[z], seg[z + 1]) for z in range(len(seg) - 1)]
    uv = np.concatenate([e[0] for e in edges]) if edges else np.zeros((0, 2), np.uint64)
    overlap = np.concatenate([e[1] for e in edges]) if edges else np.zeros(0)
    node_labels = solve_merge(int(seg.max()) + 1 if seg.size else 1, uv, overlap, beta, with_background)
    out = node_labels[seg]
    if min_z_extent:
        out = drop_short_objects(out, int(min_z_extent))
    return relabel_volume(out)


def _close_in_memory(seg: np.ndarray, g: int) -> np.ndarray:
    closed = np.zeros(seg.shape, bool)
    h, w = seg.shape[1:]
    for y in range(0, h, CLOSING_BLOCK):
        for x in range(0, w, CLOSING_BLOCK):
            ys, xs = slice(y, y + CLOSING_BLOCK), slice(x, x + CLOSING_BLOCK)
            closed[:, ys, xs] = close_along_z(seg[:, ys, xs] > 0, g)
    out = np.zeros_like(seg)
    offset = 1
    n = len(seg)
    for z in range(n):
        if z < g or z >= n - g:  # the closing cannot see past the stack's ends
            out[z], offset = _offset_plane(seg[z], offset)
        else:
            out[z], offset = closed_plane(seg[z], closed[z], offset)
    return out


def drop_short_objects(labels: np.ndarray, min_z_extent: int) -> np.ndarray:
    """Objects present on fewer than ``min_z_extent`` consecutive-plane span (last - first + 1) removed."""
    n = int(labels.max()) if labels.size else 0
    first = np.full(n + 1, len(labels), np.int64)
    last = np.full(n + 1, -1, np.int64)
    for z in range(len(labels)):
        ids = np.unique(labels[z])
        first[ids] = np.minimum(first[ids], z)
        last[ids] = np.maximum(last[ids], z)
    short = (last - first + 1) < min_z_extent
    short[0] = False
    return np.where(short[labels], 0, labels)


def relabel_volume(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..n in order of first appearance by id value (0 stays background), uint32."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.uint32)
    lut[ids.astype(np.int64)] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    return lut[labels.astype(np.int64)]
