"""Tracking over time: per-frame instances (``volume.automatic.segment_frames``) linked into tracks
with divisions by laptrack's linear-assignment tracker (Jaqaman et al.) on the objects' centroids.

A link costs the squared distance between centroids and is allowed up to ``max_distance`` px
(default: the median object diameter, i.e. objects move less than their size per frame); a
division links a track's end to two new ones within the same distance; ``gap_frames`` > 0 lets a
track skip that many frames where its object was missed. The result:

- ``labels``: the movie's labels with each object's track id (1..n, constant along a track);
- ``tracks`` / ``graph``: napari's Tracks layer data ((track id, t, y, x) rows) and
  {child track: [parent track]};
- ``lineage``: the Cell Tracking Challenge's (id, first frame, last frame, parent or 0), each track
  present in every frame of its span (a gap starts a new track whose parent is the one before);
  ``write_ctc`` writes it as ``res_track.txt`` with one ``maskTTT.tif`` per frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import PeftExportError
from .automatic import segment_frames
from .embeddings import Cancel, Progress

TRACK_EXTRA_HINT = "pip install 'peftexport[volume]' (laptrack)"


@dataclass
class TrackingResult:
    labels: np.ndarray  # T x H x W uint32: track ids
    tracks: np.ndarray  # (N, 4) float: track id, t, y, x (napari Tracks data)
    graph: Dict[int, List[int]] = field(default_factory=dict)  # child track -> [parent track]
    lineage: List[Tuple[int, int, int, int]] = field(default_factory=list)  # (id, first, last, parent)

    @property
    def n_tracks(self) -> int:
        return len(self.lineage)

    @property
    def n_divisions(self) -> int:
        parents = [p for _, _, _, p in self.lineage if p]
        return sum(1 for p in set(parents) if parents.count(p) >= 2)


def _centroids(frames: Any) -> Tuple[np.ndarray, float]:
    """(rows of frame, label, y, x, area) of every object, and the median object diameter."""
    rows = []
    for t in range(len(frames)):
        lab = np.asarray(frames[t]).astype(np.int64)
        ids, area = np.unique(lab[lab > 0], return_counts=True)
        if not len(ids):
            continue
        yy, xx = np.nonzero(lab)
        index = np.searchsorted(ids, lab[yy, xx])
        cy = np.bincount(index, weights=yy, minlength=len(ids)) / area
        cx = np.bincount(index, weights=xx, minlength=len(ids)) / area
        rows.append(np.stack([np.full(len(ids), t), ids, cy, cx, area], axis=1))
    table = np.concatenate(rows) if rows else np.zeros((0, 5))
    diameter = float(np.median(2 * np.sqrt(table[:, 4] / np.pi))) if len(table) else 0.0
    return table, diameter


def link_frames(frames: Any, max_distance: Optional[float] = None, divisions: bool = True,
                gap_frames: int = 0) -> TrackingResult:
    """Per-frame instance labels (T x H x W, any ids) linked into tracks (see the module docstring)."""
    try:
        import pandas as pd
        from laptrack import LapTrack
    except ImportError as exc:
        raise PeftExportError(f"tracking: {exc.name or 'laptrack'} is not installed; {TRACK_EXTRA_HINT}") from None
    if gap_frames < 0 or int(gap_frames) != gap_frames:
        raise PeftExportError(f"gap_frames: must be a whole number >= 0, got {gap_frames}")
    table, diameter = _centroids(frames)
    n_t = len(frames)
    shape = tuple(np.asarray(frames[0]).shape) if n_t else (0, 0)
    if max_distance is None:
        max_distance = max(diameter, 1.0)
    if not max_distance > 0:
        raise PeftExportError(f"max_distance: must be > 0 px, got {max_distance}")
    if not len(table):
        return TrackingResult(np.zeros((n_t, *shape), np.uint32), np.zeros((0, 4)))
    df = pd.DataFrame({"frame": table[:, 0].astype(int), "label": table[:, 1].astype(int), "y": table[:, 2],
                       "x": table[:, 3]})
    cutoff = float(max_distance) ** 2
    tracker = LapTrack(cutoff=cutoff, splitting_cutoff=cutoff if divisions else False,
                       gap_closing_cutoff=cutoff if gap_frames else False,
                       gap_closing_max_frame_count=max(int(gap_frames), 1), merging_cutoff=False)
    track_df, split_df, _ = tracker.predict_dataframe(df, ["y", "x"], only_coordinate_cols=False)
    parents = {int(c): int(p) for p, c in zip(split_df.get("parent_track_id", []), split_df.get("child_track_id", []))}
    return _ctc_tracks(track_df, parents, frames, shape)


def _ctc_tracks(track_df: Any, parents: Dict[int, int], frames: Any, shape: Tuple[int, ...]) -> TrackingResult:
    """laptrack's segments -> CTC tracks (a segment with a gap split in two), tracked labels, napari data."""
    pieces: Dict[int, List[Tuple[int, int]]] = {}  # laptrack track -> [(first, last)] of its gap-free pieces
    new_id: Dict[Tuple[int, int], int] = {}  # (laptrack track, frame) -> CTC id
    lineage: List[Tuple[int, int, int, int]] = []
    order = sorted(set(int(t) for t in track_df["track_id"]))
    frames_of = {k: sorted(int(f) for f in track_df.loc[track_df["track_id"] == k, "frame"]) for k in order}
    for k in order:
        runs: List[Tuple[int, int]] = []
        for f in frames_of[k]:
            if runs and f == runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], f)
            else:
                runs.append((f, f))
        pieces[k] = runs
    ids: Dict[Tuple[int, int], int] = {}  # (laptrack track, piece) -> CTC id, numbered by first frame
    for k in sorted(order, key=lambda k: frames_of[k][0]):
        for i, (a, b) in enumerate(pieces[k]):
            ids[(k, i)] = len(ids) + 1
    for k in order:
        for i, (a, b) in enumerate(pieces[k]):
            if i > 0:
                parent = ids[(k, i - 1)]
            elif k in parents:
                parent = ids[(parents[k], len(pieces[parents[k]]) - 1)]
            else:
                parent = 0
            lineage.append((ids[(k, i)], a, b, parent))
            for f in range(a, b + 1):
                new_id[(k, f)] = ids[(k, i)]
    lineage.sort()
    labels = np.zeros((len(frames), *shape), np.uint32)
    rows = []
    for t in range(len(frames)):
        sel = track_df[track_df["frame"] == t]
        if not len(sel):
            continue
        lab = np.asarray(frames[t]).astype(np.int64)
        lut = np.zeros(int(lab.max()) + 1, np.uint32)
        for k, lbl, y, x in zip(sel["track_id"], sel["label"], sel["y"], sel["x"]):
            cid = new_id[(int(k), t)]
            lut[int(lbl)] = cid
            rows.append((cid, t, float(y), float(x)))
        labels[t] = lut[lab]
    tracks = np.array(sorted(rows), np.float64).reshape(-1, 4)
    graph = {k: [p] for k, _, _, p in lineage if p}
    return TrackingResult(labels, tracks, graph, lineage)


def track(session: Any, movie: Any, mode: str = "auto", instance_options: Optional[Dict[str, Any]] = None,
          everything_options: Optional[Dict[str, Any]] = None, max_distance: Optional[float] = None,
          divisions: bool = True, gap_frames: int = 0, adapter: Optional[str] = None, progress: Progress = None,
          cancel: Cancel = None, **tiling: Any) -> TrackingResult:
    """Segment every frame of a movie (T x H x W (x 3) array, a ``Stack`` of kind t, or a
    ``VolumeEmbeddings`` of one) and link the objects into tracks with divisions."""
    frames, _ = segment_frames(session, movie, mode, instance_options, everything_options, adapter, progress, cancel,
                               **tiling)
    return link_frames(frames, max_distance, divisions, gap_frames)


def write_ctc(result: TrackingResult, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The Cell Tracking Challenge result format: ``res_track.txt`` and ``mask000.tif`` ... (uint16
    where ids allow), written into a temporary folder renamed to ``out_dir`` when complete."""
    import tifffile

    from ..data.ctc import write_ctc_tracks
    from ..fsutil import atomic_dir

    dtype = np.uint16 if result.labels.size == 0 or result.labels.max() < 2**16 else np.uint32
    digits = max(3, len(str(max(len(result.labels) - 1, 0))))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for t, frame in enumerate(result.labels):
            tifffile.imwrite(tmp / f"mask{t:0{digits}d}.tif", frame.astype(dtype))
        write_ctc_tracks(tmp / "res_track.txt", result.lineage)
    return Path(out_dir)
