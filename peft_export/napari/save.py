"""Saving results: labels to TIFF (zlib) or zarr, with the export that made them recorded.

Every layer the plugin creates carries ``metadata["peftexport"]`` (``export_metadata``): the
export's folder name and path, the peftexport version and date that wrote it, its model type,
and the backend, precision and adapter that ran. ``write_labels`` (the plugin's npe2 writer,
also napari's File > Save Selected Layers) stores that record in the TIFF's ImageDescription
as JSON, or in the zarr array's attributes; ``read_labels`` gives it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import __version__
from ..errors import PeftExportError
from ..fsutil import atomic_dir, atomic_file

KEY = "peftexport"
TIFF_SUFFIXES = (".tif", ".tiff")


def export_metadata(session: Any, adapter: Optional[str] = None) -> Dict[str, Any]:
    """What made a result: export name, version and settings (JSON-serialisable)."""
    m = session.manifest
    return {
        "export": session.export_dir.name,
        "export_dir": str(Path(session.export_dir).resolve()),
        "export_peftexport_version": m.get("peftexport_version"),
        "export_format_version": m.get("format_version"),
        "export_created": m.get("created"),
        "model_type": m.get("model_type"),
        "peft_method": (m.get("peft") or {}).get("method"),
        "adapter": adapter,
        "backend": session.backend_name,
        "precision": session.precision,
        "plugin_version": __version__,
    }


def _record(attributes: Dict[str, Any]) -> Dict[str, Any]:
    meta = dict(attributes.get("metadata") or {})
    return {"name": attributes.get("name"), KEY: meta.get(KEY)}


def write_labels(path: str, data: Any, attributes: Dict[str, Any]) -> List[str]:
    """npe2 single-layer writer: a Labels layer to ``.tif``/``.tiff`` or ``.zarr``; returns the path.

    The file is written under a temporary name and renamed, so a failed save leaves nothing behind;
    napari's save dialog has already asked before an existing file is replaced.
    """
    target = Path(path)
    labels = np.asarray(data)
    if labels.dtype.kind not in "iub":
        raise PeftExportError(f"{target}: labels must be integers, got {labels.dtype}")
    record = _record(attributes)
    suffix = target.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        import tifffile

        with atomic_file(target, overwrite=True) as tmp:
            tifffile.imwrite(tmp, labels, description=json.dumps(record), metadata=None, compression="zlib")
    elif suffix == ".zarr":
        import zarr

        chunks = (1,) * (labels.ndim - 2) + tuple(min(s, 1024) for s in labels.shape[-2:])
        with atomic_dir(target, overwrite=True) as tmp:
            arr = zarr.open_array(str(tmp), mode="w", shape=labels.shape, dtype=labels.dtype, chunks=chunks)
            arr[...] = labels
            arr.attrs.update(record)
    else:
        raise PeftExportError(f"{target}: save labels as .tif, .tiff or .zarr")
    return [str(target)]


def read_labels(path: str) -> Tuple[np.ndarray, Dict[str, Any]]:
    """(labels, {"name", "peftexport"}) of a file written by ``write_labels``."""
    source = Path(path)
    if not source.exists():
        raise PeftExportError(f"{source}: no such file")
    if source.suffix.lower() == ".zarr":
        import zarr

        arr = zarr.open_array(str(source), mode="r")
        return np.asarray(arr[...]), dict(arr.attrs)
    import tifffile

    with tifffile.TiffFile(source) as tif:
        labels = tif.asarray()
        text = tif.pages[0].description or "{}"
    try:
        record = json.loads(text)
    except ValueError:
        record = {}
    return labels, record if isinstance(record, dict) else {}
