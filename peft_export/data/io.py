"""Reading images and instance labels: TIFF, PNG, JPEG and NPY.

A file is read as a list of 2D planes, each plane one training sample. Layout rules
(documented in the README's data section):

* images: HxW, HxWxC (C = 1, 3 or 4; alpha is dropped later by normalize_intensity),
  CxHxW with C = 3 or 4 (also TIFF planar RGB) is moved to channels-last; a 3D array
  with more than 4 planes in the first axis, one with 2 planes, a TIFF whose axes say Z,
  or a multi-page TIFF (axes Q/I/T first), is a z-stack read as its 2D slices;
  ZxHxWxC is a stack of colour planes.
* labels: HxW (or HxWx1) or a ZxHxW stack; colour label images are refused. JPEG
  labels are refused because JPEG is lossy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import PeftExportError
from .labels import semantic_to_instance

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")
LABEL_EXTENSIONS = (".tif", ".tiff", ".png", ".npy")
LABEL_KINDS = ("instance", "semantic")

_INT32_MAX = np.iinfo(np.int32).max


def file_stem(path: str | os.PathLike) -> str:
    """File name without its image extension; ``a.ome.tif`` -> ``a``."""
    name = Path(path).name
    lower = name.lower()
    for ext in (".ome.tiff", ".ome.tif") + IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def is_image_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def plane_names(stem: str, n_planes: int) -> list[str]:
    """Sample names of a file's planes: ``stem`` for a 2D file, ``stem[z]`` for a stack."""
    return [stem] if n_planes == 1 else [f"{stem}[{z}]" for z in range(n_planes)]


def _read_pillow(path: Path, for_labels: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "P" and not for_labels:
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif mode == "PA" and not for_labels:
            im = im.convert("RGBA")
        arr = np.array(im)
    if mode in ("LA", "PA") and arr.ndim == 3 and arr.shape[-1] == 2:
        arr = arr[..., 0]  # value + alpha: keep the value
    return arr


def read_array(path: str | os.PathLike, for_labels: bool = False) -> tuple[np.ndarray, str | None]:
    """Raw array of a file and its TIFF axes string (``None`` when the format has none).

    Any failure becomes a PeftExportError naming the file.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise PeftExportError(f"{path}: unsupported file type {ext!r} (use {', '.join(IMAGE_EXTENSIONS)})")
    if not path.is_file():
        raise PeftExportError(f"{path}: file not found")
    try:
        if ext in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return np.asarray(series.asarray()), series.axes
        if ext == ".npy":
            return np.load(path, allow_pickle=False), None
        return _read_pillow(path, for_labels), None
    except PeftExportError:
        raise
    except Exception as e:  # corrupt files raise anything from ValueError to struct.error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PeftExportError(f"{path}: cannot read ({type(e).__name__}{': ' + msg if msg else ''})") from e


def _squeeze_leading(arr: np.ndarray, axes: str | None) -> tuple[np.ndarray, str | None]:
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
        axes = axes[1:] if axes else axes
    return arr, axes


def image_planes(arr: np.ndarray, axes: str | None = None, where: str = "image") -> list[np.ndarray]:
    """Split an image array into 2D planes (HxW or HxWxC) following the module's rules."""
    arr, axes = _squeeze_leading(np.asarray(arr), axes)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise PeftExportError(f"{where}: unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        return [arr]
    if arr.ndim == 3:
        z_axes = bool(axes) and axes[0] in "ZTQI" and axes[-1] == "X"
        if axes and "Z" in axes:
            return list(arr)
        if arr.shape[-1] in (1, 3, 4) and (not axes or axes[-1] in "SC"):
            return [arr]
        if arr.shape[0] in (3, 4) and not z_axes:
            return [np.moveaxis(arr, 0, -1)]
        return list(arr)
    if arr.ndim == 4:
        if arr.shape[-1] in (1, 3, 4):
            return list(arr)
        if arr.shape[1] in (3, 4):
            return list(np.moveaxis(arr, 1, -1))
    raise PeftExportError(f"{where}: unsupported image shape {tuple(arr.shape)}"
                          + (f" (axes {axes})" if axes else ""))


def read_image_planes(path: str | os.PathLike) -> list[np.ndarray]:
    """The 2D planes of an image file (raw dtype)."""
    arr, axes = read_array(path)
    return image_planes(arr, axes, where=str(path))


def check_label_values(arr: np.ndarray, where: str = "labels") -> np.ndarray:
    """Validate label values (integers >= 0) and return them as int32."""
    if arr.dtype == bool:
        return arr.astype(np.int32)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise PeftExportError(f"{where}: labels contain NaN or infinite values")
        if (arr != np.round(arr)).any():
            raise PeftExportError(f"{where}: labels contain non-integer values (float labels must be whole numbers)")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise PeftExportError(f"{where}: unsupported label type {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise PeftExportError(f"{where}: labels contain negative values (min {arr.min()})")
    if arr.size and arr.max() > _INT32_MAX:
        raise PeftExportError(f"{where}: label ids above {_INT32_MAX} are not supported")
    return arr.astype(np.int32)


def label_planes(arr: np.ndarray, axes: str | None = None, labels_are: str = "instance",
                 where: str = "labels") -> list[np.ndarray]:
    """Split a label array into int32 HxW planes; semantic masks become instances per plane."""
    if labels_are not in LABEL_KINDS:
        raise PeftExportError(f"labels_are: must be one of {', '.join(LABEL_KINDS)}, got {labels_are!r}")
    arr, axes = _squeeze_leading(np.asarray(arr), axes)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and ((axes and axes[-1] == "S") or (not axes and arr.shape[-1] in (3, 4) and arr.shape[0] > 4)):
        raise PeftExportError(f"{where}: labels have colour channels {tuple(arr.shape)}; "
                              "save instance labels as a single-channel integer image")
    if arr.ndim not in (2, 3):
        raise PeftExportError(f"{where}: unsupported label shape {tuple(arr.shape)} (expected HxW or ZxHxW)")
    arr = check_label_values(arr, where)
    planes = [arr] if arr.ndim == 2 else list(arr)
    if labels_are == "semantic":
        planes = [semantic_to_instance(p) for p in planes]
    return planes


def read_label_planes(path: str | os.PathLike, labels_are: str = "instance") -> list[np.ndarray]:
    """The int32 HxW label planes of a file (0 background)."""
    path = Path(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise PeftExportError(f"{path}: JPEG is lossy and cannot hold labels (use TIFF, PNG or NPY)")
    arr, axes = read_array(path, for_labels=True)
    return label_planes(arr, axes, labels_are, where=str(path))
