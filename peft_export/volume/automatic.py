"""Automatic 3D instance segmentation (micro-sam's ``automatic_3d_segmentation``): every plane
segmented on its own (AIS where the export has the instance decoder, else segment-everything;
tiled where planes are larger than the model input; SAM and SAM 2 sessions alike, through each
session's own calls), ids made unique over the stack, then the
planes' objects merged across z (``volume.merge``).

``segment_planes`` writes the per-plane labels into any Z x H x W array (numpy, or zarr for
stacks larger than memory); ``segment_volume`` returns the merged labels in memory.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import PeftExportError
from .embeddings import Cancel, Progress, VolumeEmbeddings, cancelled
from .merge import MERGE_DEFAULTS, check_merge_options, merge_instance_segmentation_3d, relabel_volume
from .stacks import Stack, stack_from_array

MODES = ("auto", "ais", "everything")


class Cancelled(PeftExportError):
    """The caller's cancel flag stopped the work (nothing is returned)."""


def resolve_mode(session: Any, mode: str, adapter: Optional[str]) -> str:
    """"ais" or "everything": "auto" is AIS where the export (adapter) has the instance decoder. Asked of the
    session (SAM's and SAM 2's share ``_ais_graph``), which refuses "ais" without the decoder, naming it."""
    if mode not in MODES:
        raise PeftExportError(f"mode: unknown {mode!r} (use {', '.join(MODES)})")
    if mode != "auto":
        if mode == "ais":
            session._ais_graph(adapter)
        return mode
    try:
        session._ais_graph(adapter)
        return "ais"
    except PeftExportError:
        return "everything"


def plane_options(mode: str, instance_options: Optional[Dict[str, Any]], everything_options: Optional[Dict[str, Any]]
                  ) -> Dict[str, Any]:
    """The checked options of the per-plane segmentation (micro-sam's AIS defaults, SAM's AMG ones)."""
    if mode == "ais":
        from ..runtime.instances import check_ais_params, require_ais_packages

        require_ais_packages()
        return check_ais_params(dict(instance_options or {}))
    from ..predict.images import everything_settings

    return everything_settings(everything_options, check=True)


def segment_plane(volume: VolumeEmbeddings, z: int, mode: str, options: Dict[str, Any]) -> np.ndarray:
    """Instance labels (int32 H x W, ids 1..n) of plane ``z``: the session's own ``segment_instances`` /
    ``segment_everything`` on the plane's embedding (SAM's or SAM 2's), or its tiles' (``runtime.tiled``)."""
    session, adapter = volume.session, volume.adapter
    if mode == "ais":
        if volume.grid.single:
            labels, _ = session.segment_instances(embedding=volume.embedding(z), adapter=adapter, **options)
        else:
            labels, _ = volume.plane(z).segment_instances(**options)
    elif volume.grid.single:
        labels, _ = session.segment_everything(embedding=volume.embedding(z), adapter=adapter, **options)
    else:
        labels, _ = volume.plane(z).segment_everything(**options)
    return np.asarray(labels)


def segment_planes(volume: VolumeEmbeddings, out: Any, mode: str, options: Dict[str, Any], offset: int = 0,
                   planes: Optional[range] = None, progress: Progress = None, cancel: Cancel = None) -> int:
    """Each plane's instances written into ``out[z]`` with ids after ``offset`` (unique over the
    stack); returns the last id used."""
    planes = planes if planes is not None else range(volume.stack.n_planes)
    for i, z in enumerate(planes):
        if cancelled(cancel):
            raise Cancelled("segment_volume: cancelled")
        labels = relabel_volume(segment_plane(volume, z, mode, options))  # ids 1..n: every id has pixels
        n = int(labels.max())
        out[z] = np.where(labels > 0, labels + np.uint32(offset), 0).astype(np.uint32)
        offset += n
        if progress is not None:
            progress(i + 1, len(planes))
    return offset


def as_volume(session: Any, data: Any, kind: str = "z", embeddings: Optional[VolumeEmbeddings] = None,
              keep: bool = False, **tiling: Any) -> VolumeEmbeddings:
    """A ``VolumeEmbeddings`` of ``data`` (a Stack, a N x H x W (x 3) array, or one already made)."""
    if isinstance(data, VolumeEmbeddings):
        return data
    if embeddings is not None:
        return embeddings
    stack = data if isinstance(data, Stack) else stack_from_array(data, kind=kind)
    return VolumeEmbeddings(session, stack, keep=keep, **tiling)


def segment_volume(
    session: Any,
    volume: Any,
    mode: str = "auto",
    instance_options: Optional[Dict[str, Any]] = None,
    everything_options: Optional[Dict[str, Any]] = None,
    beta: float = MERGE_DEFAULTS["beta"],
    with_background: bool = True,
    gap_closing: Optional[int] = None,
    min_z_extent: Optional[int] = None,
    tile: Optional[int] = None,
    halo: Optional[int] = None,
    scale: Optional[float] = None,
    adapter: Optional[str] = None,
    progress: Progress = None,
    cancel: Cancel = None,
    return_planes: bool = False,
) -> Any:
    """Automatic 3D instance segmentation of a volume: uint32 Z x H x W labels (ids 1..n).

    ``volume``: a ``VolumeEmbeddings`` (its embeddings are used and kept), a ``Stack``, or a
    Z x H x W (x 3) numpy / zarr array (embedded plane by plane, nothing kept). ``mode``: "auto"
    (AIS where the export has the instance decoder, else segment-everything), "ais" or
    "everything", with their options; then the 3D merge (``beta``, ``gap_closing``,
    ``min_z_extent``). ``progress(done, total)`` counts planes; ``cancel`` raises ``Cancelled``.
    ``return_planes``: also the per-plane labels before the merge (ids unique over the stack).
    """
    check_merge_options(beta, gap_closing, min_z_extent)
    vol = as_volume(session, volume, tile=tile, halo=halo, scale=scale, adapter=adapter)
    mode = resolve_mode(session, mode, vol.adapter)
    options = plane_options(mode, instance_options, everything_options)
    planes = np.zeros((vol.stack.n_planes, *vol.plane_shape), np.uint32)
    segment_planes(vol, planes, mode, options, progress=progress, cancel=cancel)
    merged = merge_instance_segmentation_3d(planes, beta, with_background, gap_closing, min_z_extent)
    return (merged, planes) if return_planes else merged


def segment_frames(session: Any, movie: Any, mode: str = "auto", instance_options: Optional[Dict[str, Any]] = None,
                   everything_options: Optional[Dict[str, Any]] = None, adapter: Optional[str] = None,
                   progress: Progress = None, cancel: Cancel = None, **tiling: Any) -> Tuple[np.ndarray, str]:
    """Per-frame instances of a movie (T x H x W uint32, ids unique over the movie), and the mode used."""
    vol = as_volume(session, movie, kind="t", adapter=adapter, **tiling)
    mode = resolve_mode(session, mode, vol.adapter)
    options = plane_options(mode, instance_options, everything_options)
    frames = np.zeros((vol.stack.n_planes, *vol.plane_shape), np.uint32)
    segment_planes(vol, frames, mode, options, progress=progress, cancel=cancel)
    return frames, mode
