"""Stacks of labels written as OME-Zarr (NGFF 0.4, axes z|t, y, x; chunked plane by plane) or as a
TIFF with its axes named (ZYX / TYX), whole or not at all; napari's Tracks data as CSV."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..errors import PeftExportError
from ..fsutil import zarr_named
from ..predict.arrays import NGFF_VERSION

LABEL_SUFFIXES = (".zarr", ".tif", ".tiff")
CHUNK = 1024  # yx chunk of the labels (px)


def check_labels_path(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """An output a stack of labels can go to: OUT.zarr or OUT.tif, not there unless ``overwrite``."""
    from ..predict.large_checks import check_not_url

    out = Path(out)
    check_not_url(out)
    if out.suffix.lower() not in LABEL_SUFFIXES:
        raise PeftExportError(f"{out}: a stack's labels go to OUT.zarr (OME-Zarr) or OUT.tif; name it "
                              f"{out.with_suffix('.zarr').name} or {out.with_suffix('.tif').name}")
    if out.exists() and not overwrite:
        raise PeftExportError(f"{out}: already exists (pass --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise PeftExportError(f"{parent}: output directory does not exist")
    return out


def stack_labels_metadata(kind: str, name: str, source: str) -> Dict[str, Any]:
    """OME-NGFF 0.4 attributes of a one-level (z|t, y, x) labels image."""
    first = {"name": kind, "type": "time" if kind == "t" else "space"}
    return {
        "multiscales": [{
            "version": NGFF_VERSION, "name": name,
            "axes": [first, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
        }],
        "image-label": {"version": NGFF_VERSION, "source": {"image": source}},
    }


def finish_volume_labels(group: Any, name: str, source: str) -> None:
    """A volume's (z, y, x) labels group made an OME-NGFF labels image (``volume.slabs``'s end)."""
    group.attrs.update(stack_labels_metadata("z", name, source))


def create_stack_labels(path: Path, shape: tuple, kind: str, source: str) -> Any:
    """A zarr-2 group at ``path`` with an empty uint32 array "0" chunked one plane x 1024 x 1024."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    chunks = (1, min(CHUNK, int(shape[1])), min(CHUNK, int(shape[2])))
    group.create_array("0", shape=tuple(int(s) for s in shape), chunks=chunks, dtype="uint32", fill_value=0)
    group.attrs["peftexport"] = {"source": source, "kind": kind}
    return group


def write_stack_labels(labels: np.ndarray, out: str | os.PathLike, kind: str, source: str, overwrite: bool = False,
                       record: Optional[Dict[str, Any]] = None) -> Path:
    """``labels`` (N x H x W) to OUT.zarr (OME-Zarr labels) or OUT.tif, replacing ``out`` only when complete."""
    from ..fsutil import atomic_dir, atomic_file

    out = check_labels_path(out, overwrite)
    labels = np.asarray(labels)
    if zarr_named(out):
        with atomic_dir(out, overwrite=overwrite) as tmp:
            group = create_stack_labels(tmp, labels.shape, kind, source)
            for z in range(len(labels)):
                group["0"][z] = labels[z].astype(np.uint32)
            group.attrs.update(stack_labels_metadata(kind, out.stem, source))
            if record is not None:
                group.attrs["peftexport"] = record
        return out
    import tifffile

    dtype = np.uint16 if labels.size == 0 or labels.max() < 2**16 else np.uint32
    with atomic_file(out, overwrite=overwrite) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), metadata={"axes": kind.upper() + "YX"}, photometric="minisblack")
    return out


def write_tracks_csv(tracks: np.ndarray, graph: Dict[int, list], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """napari's Tracks layer data as CSV: track_id, t, y, x, parent_track_id (0: none)."""
    from ..fsutil import atomic_file

    lines = ["track_id,t,y,x,parent_track_id"]
    for k, t, y, x in np.asarray(tracks).reshape(-1, 4):
        parent = (graph.get(int(k)) or [0])[0]
        lines.append(f"{int(k)},{int(t)},{y:.3f},{x:.3f},{parent}")
    with atomic_file(out, overwrite=overwrite) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return Path(out)
