"""Saving results: labels to TIFF (zlib) or zarr, with the export that made them recorded.

Every layer the plugin creates carries ``metadata["peftexport"]`` (``export_metadata``): the
export's folder name and path, the peftexport version and date that wrote it, its model type,
and the backend, precision and adapter that ran. ``write_labels`` (the plugin's npe2 writer,
also napari's File > Save Selected Layers) stores that record in the TIFF's ImageDescription
as JSON, or in the zarr array's attributes; ``read_labels`` gives it back.

A multiscale layer (the plugin's lazily backed results, ``pyramid``) is saved at full
resolution, block by block: a tiled TIFF (BigTIFF above 2 GiB) or zarr chunks, never the whole
array in memory. ``progress(done, total)`` is called after each block (the widget's Cancel
raises from it, and the temporary file is removed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .. import __version__
from ..errors import PeftExportError
from ..fsutil import atomic_dir, atomic_file, zarr_named

KEY = "peftexport"
TIFF_SUFFIXES = (".tif", ".tiff")
BLOCK = 1024  # px: the TIFF tiles and zarr chunks of a streamed save (a multiple of 16, as TIFF tiles must be)


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


def write_labels(path: str, data: Any, attributes: Dict[str, Any],
                 progress: Optional[Callable[[int, int], None]] = None) -> List[str]:
    """npe2 single-layer writer: a Labels layer to ``.tif``/``.tiff`` or ``.zarr``; returns the path.

    The file is written under a temporary name and renamed, so a failed save leaves nothing behind;
    napari's save dialog has already asked before an existing file is replaced.
    """
    target = Path(path)
    if isinstance(data, Sequence):  # a multiscale layer: its full resolution
        data = data[0]
    streamed = not isinstance(data, np.ndarray)
    labels = data if streamed else np.asarray(data)
    if np.dtype(labels.dtype).kind not in "iub":
        raise PeftExportError(f"{target}: labels must be integers, got {labels.dtype}")
    record = _record(attributes)
    suffix = target.suffix.lower()
    shape = tuple(int(n) for n in labels.shape)
    blocks = list(_blocks(shape)) if streamed else [tuple(slice(None) for _ in shape)]
    if suffix in TIFF_SUFFIXES:
        import tifffile

        with atomic_file(target, overwrite=True) as tmp:
            if streamed:
                big = int(np.prod(shape, dtype=np.int64)) * np.dtype(labels.dtype).itemsize > 2**31 - 2**25
                tifffile.imwrite(tmp, (v.reshape(v.shape[-2:]) for v in _read(labels, blocks, progress)), shape=shape, dtype=labels.dtype,
                                 tile=(BLOCK, BLOCK), bigtiff=big, description=json.dumps(record), metadata=None,
                                 compression="zlib")
            else:
                tifffile.imwrite(tmp, labels, description=json.dumps(record), metadata=None, compression="zlib")
    elif suffix == ".zarr":
        import zarr

        chunks = (1,) * (labels.ndim - 2) + tuple(min(s, BLOCK) for s in shape[-2:])
        with atomic_dir(target, overwrite=True) as tmp:
            arr = zarr.open_array(str(tmp), mode="w", shape=shape, dtype=labels.dtype, chunks=chunks)
            for block, values in zip(blocks, _read(labels, blocks, progress)):
                arr[block] = values
            arr.attrs.update(record)
    else:
        raise PeftExportError(f"{target}: save labels as .tif, .tiff or .zarr")
    return [str(target)]


def _blocks(shape: Tuple[int, ...]) -> Iterator[Tuple[slice, ...]]:
    """BLOCK x BLOCK tiles of every plane, plane by plane, rows of tiles top to bottom (TIFF's tile order)."""
    h, w = shape[-2:]
    for lead in np.ndindex(*shape[:-2]):
        for y in range(0, h, BLOCK):
            for x in range(0, w, BLOCK):
                yield tuple(slice(i, i + 1) for i in lead) + (slice(y, min(h, y + BLOCK)), slice(x, min(w, x + BLOCK)))


def _read(labels: Any, blocks: List[Tuple[slice, ...]], progress: Optional[Callable[[int, int], None]]
          ) -> Iterator[np.ndarray]:
    for done, block in enumerate(blocks, start=1):
        values = np.asarray(labels[block])
        if progress is not None:  # before the yield: a TIFF writer stops at the last tile, not after it
            progress(done, len(blocks))
        yield values


def read_labels(path: str) -> Tuple[np.ndarray, Dict[str, Any]]:
    """(labels, {"name", "peftexport"}) of a file written by ``write_labels``."""
    source = Path(path)
    if not source.exists():
        raise PeftExportError(f"{source}: no such file")
    if zarr_named(source):
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
