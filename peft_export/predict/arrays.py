"""Large images as arrays that read one window at a time: TIFF (memory-mapped when the file is
uncompressed and contiguous, else through tifffile's zarr view), ``.npy`` (memory-mapped), zarr
and OME-Zarr; and labels written to OME-Zarr chunk by chunk.

PNG and JPEG cannot be read by window: they are decoded whole, once per process (the last one
decoded is kept, so a worker's tiles of one image share it), and refused above
``MAX_DECODED_PIXELS`` with the command that converts them to zarr.

OME-Zarr follows OME-NGFF 0.4 (zarr format 2): a group whose ``multiscales`` attribute lists its
datasets (level 0 = full resolution) and ``axes``; labels are written as such a group with one
level, plus ``image-label`` metadata, so napari / ome-zarr-py read them.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Sequence, Tuple

import numpy as np

from ..errors import PeftExportError

NGFF_VERSION = "0.4"
LARGE_SUFFIXES = (".zarr", ".tif", ".tiff", ".ome.tif", ".ome.tiff")
# PNG / JPEG are decoded whole: 64 Mpx is 192 MB of RGB per process holding it (and below
# Pillow's decompression-bomb warning at 89 Mpx).
MAX_DECODED_PIXELS = 64_000_000
TO_ZARR = ('python -c "import sys, numpy as np, zarr; from PIL import Image; Image.MAX_IMAGE_PIXELS = None; '
           'a = np.asarray(Image.open(sys.argv[1])); zarr.create_array(sys.argv[2], data=a, '
           'chunks=(1024, 1024) + a.shape[2:])" {src} {dst}')
_DECODED: dict = {}  # (path, mtime_ns, bytes) -> the one decoded PNG/JPEG this process keeps


def is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in (".zgroup", ".zarray", "zarr.json"))


class ChannelLast:
    """A (C, H, W) array read as (H, W, C) one window at a time."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = (array.shape[1], array.shape[2], array.shape[0])
        self.dtype = array.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        ys, xs = key[:2] if isinstance(key, tuple) else (key, slice(None))
        return np.moveaxis(np.asarray(self.array[:, ys, xs]), 0, -1)


def _image_of(array: Any, where: str, axes: Sequence[str] = ()) -> Any:
    """An (H, W) or (H, W, C) view of ``array``: leading axes of length 1 dropped, a channel axis
    (named "c", or the first of 3) moved last."""
    shape = tuple(int(s) for s in array.shape)
    if not np.issubdtype(np.dtype(array.dtype), np.number) and np.dtype(array.dtype) != bool:
        raise PeftExportError(f"{where}: holds {array.dtype} values, not an image")
    names = list(axes) if len(axes) == len(shape) else [""] * len(shape)
    keep = [i for i, s in enumerate(shape) if s > 1 or i >= len(shape) - 2]
    if len(keep) == 2 or (len(keep) == 3 and shape[keep[-1]] in (3, 4) and names[keep[-1]] in ("", "c")):
        index = tuple(slice(None) if i in keep else 0 for i in range(len(shape)))
        return array if len(keep) == len(shape) else _Squeezed(array, index)
    if len(keep) == 3 and shape[keep[0]] in (1, 3, 4) and names[keep[0]] in ("", "c"):
        index = tuple(slice(None) if i in keep else 0 for i in range(len(shape)))
        inner = array if len(keep) == len(shape) else _Squeezed(array, index)
        return ChannelLast(inner)
    raise PeftExportError(f"{where}: shape {shape}{' axes ' + ''.join(names) if any(names) else ''} is not one "
                          "2D image (gray or RGB); save one plane or level per file")


class _Squeezed:
    """``array[index]`` without reading it: the fixed leading indices applied on each read."""

    def __init__(self, array: Any, index: Tuple[Any, ...]) -> None:
        self.array, self.index = array, index
        self.shape = tuple(int(s) for s, i in zip(array.shape, index) if isinstance(i, slice))
        self.dtype = array.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        it = iter(key)
        full = tuple(next(it, slice(None)) if isinstance(i, slice) else i for i in self.index)
        return np.asarray(self.array[full])


def open_zarr_image(path: Path) -> Any:
    """Level 0 of an OME-Zarr image, or a plain zarr array, as an (H, W[, C]) array."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for a damaged store
        raise PeftExportError(f"{path}: cannot open as zarr ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Array):
        return _image_of(node, str(path))
    ms = node.attrs.get("multiscales") or (node.attrs.get("ome") or {}).get("multiscales")
    if ms:
        first = ms[0]
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in first.get("axes", [])]
        level = first["datasets"][0]["path"]
        if level not in node:
            raise PeftExportError(f"{path}: OME-Zarr level {level!r} listed in multiscales is missing")
        return _image_of(node[level], f"{path}/{level}", axes)
    arrays = list(node.array_keys())
    if len(arrays) == 1:
        return _image_of(node[arrays[0]], f"{path}/{arrays[0]}")
    raise PeftExportError(f"{path}: a zarr group without OME-NGFF multiscales and with "
                          f"{len(arrays)} arrays: not an image (give the array's path, e.g. {path}/0)")


def open_tiff_image(path: Path) -> Any:
    """A TIFF's first series: memory-mapped if the file allows, else read window by window."""
    import tifffile

    try:
        arr = tifffile.memmap(str(path), mode="r")
    except (ValueError, OSError):  # compressed or tiled: tifffile's zarr view decodes what is read
        import zarr

        try:
            arr = zarr.open(tifffile.imread(str(path), aszarr=True), mode="r")
        except Exception as exc:  # noqa: BLE001
            raise PeftExportError(f"{path}: cannot read as TIFF ({type(exc).__name__}: {exc})") from None
        if not isinstance(arr, zarr.Array):  # pyramidal TIFF: level 0
            arr = arr[next(iter(arr.array_keys()))]
    return _image_of(arr, str(path))


def open_image_array(path: str | os.PathLike) -> Any:
    """Any image as an (H, W[, C]) array read window by window where the format allows."""
    path = Path(path)
    if is_zarr(path):
        return open_zarr_image(path)
    if path.is_dir():
        raise PeftExportError(f"{path}: a directory that is not a zarr store")
    if not path.is_file():
        raise PeftExportError(f"{path}: no such file")
    if path.suffix.lower() in (".tif", ".tiff"):
        return open_tiff_image(path)
    if path.suffix.lower() == ".npy":
        return open_npy_image(path)
    return decoded_image(path)


class NpyWindows:
    """A ``.npy`` file read one window at a time: each read memory-maps the file, copies the window
    out and unmaps it again, so the pages a read touched do not stay resident (one map kept for
    the whole run would hold every page any read ever touched)."""

    def __init__(self, path: Path) -> None:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        self.path, self.shape, self.dtype = path, tuple(arr.shape), arr.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(np.load(self.path, mmap_mode="r", allow_pickle=False)[key])


def open_npy_image(path: Path) -> Any:
    """A ``.npy`` file read by window through memory maps (``NpyWindows``): never loaded whole."""
    try:
        arr = NpyWindows(path)
    except (ValueError, OSError) as exc:
        raise PeftExportError(f"{path}: cannot read as .npy ({type(exc).__name__}: {exc})") from None
    return _image_of(arr, str(path))


def decoded_image(path: Path) -> np.ndarray:
    """A PNG / JPEG (or other whole-file format) decoded once per process; refused above
    ``MAX_DECODED_PIXELS`` (read from the header, before decoding) with the zarr hint."""
    from PIL import Image, UnidentifiedImageError

    from .images import read_image

    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _DECODED:
        return _DECODED[key]
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError):
        w = h = 0  # read_image says what is wrong with it
    if w * h > MAX_DECODED_PIXELS:
        raise PeftExportError(f"{path}: {w}x{h} px is too large to decode whole on every worker (at most "
                              f"{MAX_DECODED_PIXELS // 1_000_000} Mpx for {path.suffix}); convert it once to zarr, "
                              "which is read tile by tile: " + TO_ZARR.format(
                                  src=shlex.quote(str(path)), dst=shlex.quote(str(path.with_suffix(".zarr")))))
    _DECODED.clear()
    _DECODED[key] = read_image(path)
    return _DECODED[key]


def labels_metadata(name: str, source: str) -> dict:
    """OME-NGFF 0.4 attributes of a one-level (y, x) labels image."""
    return {
        "multiscales": [{
            "version": NGFF_VERSION, "name": name,
            "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}],
        }],
        "image-label": {"version": NGFF_VERSION, "source": {"image": source}},
    }


def create_labels_group(path: Path, shape: Tuple[int, int], chunk: int, name: str, source: str) -> Any:
    """A zarr-2 group at ``path`` with an empty uint32 labels array "0" chunked ``chunk`` x ``chunk``;
    returns the group (OME metadata written by ``finish_labels``)."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=tuple(shape), chunks=(chunk, chunk), dtype="uint32", fill_value=0)
    group.attrs["peftexport"] = {"name": name, "source": source}
    return group


def finish_labels(group: Any, name: str, source: str) -> None:
    group.attrs.update(labels_metadata(name, source))
