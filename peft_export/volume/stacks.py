"""Stacks of 2D planes read one plane (or window) at a time: multi-page TIFF, zarr and OME-Zarr
volumes (ZYX) and movies (TYX), with a channel axis (CZYX, ZCYX, ...) reduced to the chosen channel
or kept as RGB; and labels written back as TIFF or OME-Zarr, plane by plane.

The stacked axis is named from the file (TIFF series axes, OME-NGFF ``axes``) or from ``axes``
(e.g. ``"tyx"``, ``"czyx"``): ``z`` for a volume, ``t`` for a movie. Axes TIFF leaves unnamed
(Q, I) count as z. A plane is H x W (gray) or H x W x 3 (RGB); ``Stack.plane_view(i)`` is an
array-like of one plane that reads only the window asked for (what ``runtime.tiled`` needs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np

from ..errors import PeftExportError

STACK_AXES = ("z", "t")
# tifffile's axis letters; Q and I (pages it cannot name) become the stacked axis asked for ("?").
_TIFF_NAMES = {"Z": "z", "T": "t", "C": "c", "S": "c", "Y": "y", "X": "x", "Q": "?", "I": "?"}


@dataclass(frozen=True)
class Stack:
    """N planes of H x W (x 3) behind ``array``: ``index`` says how plane i, window (ys, xs) is read."""

    array: Any
    axes: str  # the source's axes, lower case (e.g. "czyx"); the stacked axis is ``kind``
    kind: str  # "z" or "t"
    channel: Optional[int]
    source: str

    @property
    def n_planes(self) -> int:
        return int(self.array.shape[self.axes.index(self.kind)])

    @property
    def plane_shape(self) -> Tuple[int, int]:
        return int(self.array.shape[self.axes.index("y")]), int(self.array.shape[self.axes.index("x")])

    @property
    def rgb(self) -> bool:
        return "c" in self.axes and self.channel is None

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.n_planes, *self.plane_shape) + ((3,) if self.rgb else ())

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, i: Any, ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        """Plane(s) ``i`` (an int or a slice of planes), window ys x xs, as numpy (channel last)."""
        key = []
        for a in self.axes:
            key.append({"y": ys, "x": xs}.get(a, i if a == self.kind else (self.channel if self.channel is not None
                                                                            else slice(None))))
        out = np.asarray(self.array[tuple(key)])
        kept = [a for a, k in zip(self.axes, key) if not isinstance(k, (int, np.integer))]
        if "c" in kept:
            order = [kept.index(a) for a in kept if a != "c"] + [kept.index("c")]
            out = np.transpose(out, order)
            out = out[..., :3] if out.shape[-1] >= 3 else np.concatenate(
                [out, np.zeros(out.shape[:-1] + (3 - out.shape[-1],), out.dtype)], axis=-1)
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(int(i))

    def __len__(self) -> int:
        return self.n_planes

    def plane_view(self, i: int) -> "PlaneView":
        return PlaneView(self, int(i))


class PlaneView:
    """One plane of a stack as an (H, W[, 3]) array-like: ``view[ys, xs]`` reads that window only."""

    def __init__(self, stack: Stack, i: int) -> None:
        self.stack, self.i = stack, i
        self.shape = stack.shape[1:]
        self.dtype = stack.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        ys = key[0] if len(key) > 0 else slice(None)
        xs = key[1] if len(key) > 1 else slice(None)
        if not (isinstance(ys, slice) and isinstance(xs, slice)):
            return np.asarray(self.stack.read(self.i))[key]
        out = self.stack.read(self.i, ys, xs)
        return out[(slice(None), slice(None)) + key[2:]] if len(key) > 2 else out

    def __array__(self, dtype=None, copy=None):
        out = self.stack.read(self.i)
        return out if dtype is None else out.astype(dtype)


def _normalise_axes(axes: str, ndim: int, where: str) -> str:
    axes = axes.lower()
    if len(axes) != ndim or len(set(axes)) != ndim or set(axes) - set("tzcyx") or "yx" not in axes[-3:]:
        raise PeftExportError(f"{where}: axes {axes!r} do not describe a {ndim}-dimensional array (letters of "
                              "t, z, c, y, x, each once, ending in yx; e.g. zyx, tyx, czyx)")
    return axes


def _tiff_array(path: Path) -> Tuple[Any, str]:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            axes = "".join(_TIFF_NAMES.get(a, a.lower()) for a in series.axes)
            n_series_pages = len(series.pages)
            shapes = {p.shape for p in tif.pages}
            n_pages = len(tif.pages)
        if n_pages > n_series_pages and len(shapes) > 1:
            raise PeftExportError(f"{path}: its {n_pages} pages have different sizes "
                                  f"({', '.join('x'.join(map(str, s)) for s in sorted(shapes))}); a stack needs "
                                  "planes of one size")
        try:
            arr = tifffile.memmap(str(path), mode="r")
        except (ValueError, OSError):  # compressed: tifffile's zarr view decodes what is read
            import zarr

            arr = zarr.open(tifffile.imread(str(path), aszarr=True), mode="r")
            if not hasattr(arr, "shape"):
                arr = arr[next(iter(arr.array_keys()))]
    except PeftExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for damaged files
        raise PeftExportError(f"{path}: cannot read as TIFF ({type(exc).__name__}: {exc})") from None
    if len(axes) != len(arr.shape):  # memmap squeezed or tifffile's names do not fit: unnamed
        axes = ""
    return arr, axes


def _zarr_array(path: Path) -> Tuple[Any, str]:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for a damaged store
        raise PeftExportError(f"{path}: cannot open as zarr ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Array):
        return node, ""
    ms = node.attrs.get("multiscales") or (node.attrs.get("ome") or {}).get("multiscales")
    if ms:
        level = ms[0]["datasets"][0]["path"]
        if level not in node:
            raise PeftExportError(f"{path}: OME-Zarr level {level!r} listed in multiscales is missing")
        names = "".join((a["name"] if isinstance(a, dict) else str(a))[:1].lower() for a in ms[0].get("axes", []))
        return node[level], names
    arrays = list(node.array_keys())
    if len(arrays) == 1:
        return node[arrays[0]], ""
    raise PeftExportError(f"{path}: a zarr group without OME-NGFF multiscales and with {len(arrays)} arrays: "
                          f"not a stack (give the array's path, e.g. {path}/0)")


def _raw_array(path: Path) -> Tuple[Any, str]:
    from ..predict.arrays import is_zarr

    if is_zarr(path):
        return _zarr_array(path)
    if not path.exists():
        raise PeftExportError(f"{path}: no such file")
    if path.is_dir():
        raise PeftExportError(f"{path}: a directory that is not a zarr store")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return _tiff_array(path)
    if suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False), ""
        except ValueError as exc:
            raise PeftExportError(f"{path}: cannot read as .npy ({exc})") from None
    raise PeftExportError(f"{path}: a stack is a TIFF, .npy, zarr or OME-Zarr (got {suffix or 'no suffix'})")


def _guess_axes(shape: Tuple[int, ...], named: str, kind: str) -> str:
    """Axes of an array whose file did not name them: YX last, a small last axis (3/4) is colour."""
    if named:
        return named
    if len(shape) == 3:
        return kind + "yx"
    if len(shape) == 4 and shape[-1] in (3, 4):
        return kind + "yxc"
    if len(shape) == 4 and shape[0] <= 4 < shape[1]:
        return "c" + kind + "yx"
    return ""


def open_stack(path: str | os.PathLike, kind: str = "z", axes: Optional[str] = None,
               channel: Optional[int] = None) -> Stack:
    """A stack of planes from a TIFF, .npy, zarr or OME-Zarr; ``kind`` "z" (a volume) or "t" (a movie).

    ``axes`` overrides the file's own names (e.g. "tyx" for a TIFF that calls its time axis Z or
    Q). A channel axis needs ``channel`` unless it holds 3 (RGB) values. Refused with one line:
    a 2D image, a stack without the asked-for axis (a movie without t), planes of different
    sizes, a channel that is not there."""
    if kind not in STACK_AXES:
        raise PeftExportError(f"kind: {kind!r} (use z for a volume or t for a movie)")
    path = Path(path)
    arr, named = _raw_array(path)
    shape = tuple(int(s) for s in arr.shape)
    where = str(path)
    if not np.issubdtype(np.dtype(arr.dtype), np.number) and np.dtype(arr.dtype) != bool:
        raise PeftExportError(f"{where}: holds {arr.dtype} values, not an image")
    if axes is not None:
        names = _normalise_axes(axes, len(shape), where)
    else:
        names = _guess_axes(shape, named, kind)
        # length-1 axes the file has but we do not need (e.g. OME's c of a gray volume) are kept and read at 0
    if not names:
        raise PeftExportError(f"{where}: shape {shape} is not a stack of planes that this can name; give --axes "
                              "(e.g. zyx, tyx, czyx)")
    names = _normalise_axes(names.replace("?", kind) if kind not in names else names.replace("?", ""), len(shape),
                            where)
    sizes = dict(zip(names, shape))
    other = {"z": "t", "t": "z"}[kind]
    if kind not in names:
        if other in names and sizes[other] > 1:
            raise PeftExportError(f"{where}: has no {'time' if kind == 't' else 'z'} axis (its axes are "
                                  f"{names}); name the stacked axis with --axes, e.g. --axes "
                                  f"{names.replace(other, kind)}")
        raise PeftExportError(f"{where}: shape {shape} (axes {names}) is a 2D image, not a "
                              f"{'movie' if kind == 't' else 'volume'} (a stack needs a {kind} axis)")
    extra = [a for a in names if a not in (kind, "c", "y", "x")]
    if any(sizes[a] > 1 for a in extra):
        raise PeftExportError(f"{where}: axes {names} with shape {shape}: give one {kind} stack (the "
                              f"{', '.join(extra)} axis has more than one position; save one per file)")
    if sizes[kind] < 1 or sizes["y"] < 1 or sizes["x"] < 1:
        raise PeftExportError(f"{where}: an empty stack (shape {shape})")
    if "c" in names:
        n_c = sizes["c"]
        if channel is not None and not 0 <= channel < n_c:
            raise PeftExportError(f"{where}: --channel {channel}: it has {n_c} channel(s) (0..{n_c - 1})")
        if channel is None and n_c == 1:
            channel = 0
        if channel is None and n_c not in (3, 4):
            raise PeftExportError(f"{where}: {n_c} channels; choose one with --channel (0..{n_c - 1})")
    elif channel is not None:
        raise PeftExportError(f"{where}: --channel {channel}: it has no channel axis (axes {names})")
    stack_array = _FixedAxes(arr, names, extra) if extra else arr
    return Stack(stack_array, "".join(a for a in names if a not in extra), kind, channel, where)


class _FixedAxes:
    """``array`` with its length-1 axes ``fixed`` read at 0 (so Stack sees only t/z, c, y, x)."""

    def __init__(self, array: Any, names: str, fixed: list) -> None:
        self.array, self.names, self.fixed = array, names, set(fixed)
        self.shape = tuple(s for a, s in zip(names, array.shape) if a not in self.fixed)
        self.dtype = array.dtype

    def __getitem__(self, key: Tuple[Any, ...]) -> np.ndarray:
        it = iter(key)
        return np.asarray(self.array[tuple(0 if a in self.fixed else next(it) for a in self.names)])


def stack_from_array(array: Any, kind: str = "z", axes: Optional[str] = None, channel: Optional[int] = None,
                     name: str = "array") -> Stack:
    """A ``Stack`` over an in-memory or zarr array (what napari layers hold): N x H x W, N x H x W x 3,
    or any layout ``axes`` names."""
    shape = tuple(int(s) for s in array.shape)
    if len(shape) < 3:
        raise PeftExportError(f"{name}: shape {shape} is a 2D image, not a {'movie' if kind == 't' else 'volume'}")
    names = _normalise_axes(axes, len(shape), name) if axes else _guess_axes(shape, "", kind)
    if not names or kind not in names:
        raise PeftExportError(f"{name}: shape {shape}: give axes (e.g. {kind}yx) naming its {kind} axis")
    if "c" in names and channel is None and shape[names.index("c")] not in (1, 3, 4):
        raise PeftExportError(f"{name}: {shape[names.index('c')]} channels; choose one with channel=")
    if "c" in names and channel is None and shape[names.index("c")] == 1:
        channel = 0
    return Stack(array, names, kind, channel, name)
