"""SAM image preprocessing in numpy, bit-exact with segment_anything's torch path.

segment_anything's ``ResizeLongestSide.apply_image`` runs
``torchvision.transforms.functional.resize(to_pil_image(image), size)`` on uint8,
whose default interpolation is PIL's BILINEAR (not bicubic). ``resize_pil`` calls
Pillow itself when it is installed (fast: 4000x4000 RGB in a fraction of a second);
without Pillow (the runtime needs only numpy + onnxruntime) both PIL filters are
implemented here with Pillow's own algorithm (``libImaging/Resample.c``): a
separable, antialiased convolution (support scaled by the downscale factor),
weights normalised in float64 then turned into 22-bit fixed point, one pass per
axis in int32 as Pillow does, each rounded and clipped to uint8.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from ..errors import PeftExportError
from .intensity import normalize_intensity

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# What segment_anything actually does (torchvision's default for PIL images).
SAM_INTERPOLATION = "bilinear"

_PRECISION_BITS = 32 - 8 - 2


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Same operation order as Pillow's bicubic_filter so the doubles agree bit for bit.
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


def preprocess_shape(h: int, w: int, target_length: int) -> Tuple[int, int]:
    """(new_h, new_w) with the long side = target_length (ResizeLongestSide.get_preprocess_shape)."""
    scale = target_length * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _float_coefficients(in_size: int, out_size: int, interpolation: str) -> Tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs (also torch's ``interpolate(antialias=True)``): (xmin (out,), weights (out, k))."""
    filt, filter_support = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    # C's (int) cast truncates towards zero; negatives are clamped to 0 right after anyway.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    ks = np.arange(ksize)
    valid = ks[None, :] < xmax[:, None]
    w = filt((ks[None, :] + xmin[:, None] - center[:, None] + 0.5) * ss)
    w = np.where(valid, w, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):  # sequential sum, as in C
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    return xmin, w


def _coefficients(in_size: int, out_size: int, interpolation: str) -> Tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc: (xmin (out,), int weights (out, k))."""
    xmin, w = _float_coefficients(in_size, out_size, interpolation)
    scaled = w * (1 << _PRECISION_BITS)
    kk = np.where(scaled < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return xmin, kk


# Lines of the other axis resampled at once: bounds the int32 temporaries (~16 MB for 4000-px RGB lines).
_CHUNK_LINES = 256


def _resample_axis(img: np.ndarray, out_size: int, axis: int, interpolation: str) -> np.ndarray:
    in_size = img.shape[axis]
    xmin, kk = _coefficients(in_size, out_size, interpolation)
    kk = kk.astype(np.int32)  # Pillow's INT32 accumulator: |sum| <= 255 * 1.25 * 2**22 < 2**31
    src = np.moveaxis(img, axis, 0)
    out = np.empty((out_size,) + src.shape[1:], dtype=np.uint8)
    extra = (1,) * (src.ndim - 1)
    taps = [(np.minimum(xmin + k, in_size - 1), kk[:, k].reshape((-1,) + extra))
            for k in range(kk.shape[1]) if kk[:, k].any()]
    lines = src.shape[1] if src.ndim > 1 else 1
    for start in range(0, lines, _CHUNK_LINES):
        block = src[:, start:start + _CHUNK_LINES] if src.ndim > 1 else src
        acc = np.full((out_size,) + block.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int32)
        for idx, weight in taps:
            acc += block[idx].astype(np.int32) * weight
        acc >>= _PRECISION_BITS
        np.clip(acc, 0, 255, out=acc)
        if src.ndim > 1:
            out[:, start:start + _CHUNK_LINES] = acc
        else:
            out[:] = acc
    return np.moveaxis(out, 0, axis)


def resize_float(image: np.ndarray, size_hw: Tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """A 2D float image resized with antialiasing, in float32 (torch's ``F.interpolate(..., antialias=True)``,
    which SAM's ``ResizeLongestSide.apply_image_torch`` uses; Pillow's filters without 8-bit rounding)."""
    out = np.asarray(image, np.float32)
    for axis, size in ((1, size_hw[1]), (0, size_hw[0])):  # width first, as torch and Pillow do
        if size == out.shape[axis]:
            continue
        xmin, w = _float_coefficients(out.shape[axis], size, interpolation)
        src = np.moveaxis(out, axis, 0)
        acc = np.zeros((size,) + src.shape[1:], np.float32)
        for k in range(w.shape[1]):
            weight = w[:, k].astype(np.float32).reshape((-1,) + (1,) * (src.ndim - 1))
            acc += src[np.minimum(xmin + k, src.shape[0] - 1)] * weight
        out = np.moveaxis(acc, 0, axis)
    return np.ascontiguousarray(out)


def pillow_available() -> bool:
    """Whether ``resize_pil`` can hand the work to Pillow (imported lazily: not a runtime requirement)."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def _resize_with_pillow(image: np.ndarray, out_h: int, out_w: int, interpolation: str) -> np.ndarray:
    from PIL import Image

    filters = getattr(Image, "Resampling", Image)  # Pillow < 9.1 has the names on Image
    resample = {"bilinear": filters.BILINEAR, "bicubic": filters.BICUBIC}[interpolation]
    if image.ndim == 2 or image.shape[2] == 3:  # 'L' and 'RGB': what segment_anything hands Pillow
        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((out_w, out_h), resample))
    # Other channel counts one 'L' plane at a time (Pillow would premultiply an RGBA image's alpha).
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize((out_w, out_h), resample))
              for c in range(image.shape[2])]
    return np.stack(planes, axis=-1)


def resize_pil(
    image: np.ndarray, size_hw: Tuple[int, int], interpolation: str = "bilinear", backend: str = "auto"
) -> np.ndarray:
    """Resize a uint8 HxW or HxWxC image to size_hw exactly as ``PIL.Image.resize`` does.

    ``backend``: ``pillow`` (Pillow itself), ``numpy`` (the same arithmetic in numpy, for
    installs without Pillow; slower, ~12x on a 4000x4000 RGB image) or ``auto`` (Pillow when
    importable). Both give identical pixels (tests compare them with segment_anything).
    """
    if interpolation not in _FILTERS:
        raise PeftExportError(f"interpolation: unknown '{interpolation}' (use bilinear or bicubic)")
    if backend not in ("auto", "pillow", "numpy"):
        raise PeftExportError(f"resize backend: unknown '{backend}' (use auto, pillow or numpy)")
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise PeftExportError(f"resize: expected a uint8 image, got {image.dtype}")
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    if out_h < 1 or out_w < 1:
        raise PeftExportError(f"resize: bad output size {size_hw}")
    if image.ndim not in (2, 3):
        raise PeftExportError(f"resize: expected HxW or HxWxC, got shape {image.shape}")
    if backend == "pillow" or (backend == "auto" and pillow_available()):
        return _resize_with_pillow(image, out_h, out_w, interpolation)
    in_h, in_w = image.shape[:2]
    # Recent Pillow (checked: 13.0, ImagingResampleInner) runs the vertical pass first
    # when the height shrinks by more than twice as many pixels as the width; older
    # Pillows always went horizontal first. The order changes the uint8 rounding of the intermediate image.
    horizontal_first = not (in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2)
    order = (1, 0) if horizontal_first else (0, 1)
    out = image
    for axis in order:
        size = out_w if axis == 1 else out_h
        if size != image.shape[axis]:  # Pillow skips a pass whose size does not change
            out = _resample_axis(out, size, axis, interpolation)
    return np.ascontiguousarray(out)


def resize_longest_side(
    image: np.ndarray, target_length: int, interpolation: str = SAM_INTERPOLATION, backend: str = "auto"
) -> np.ndarray:
    """ResizeLongestSide.apply_image without torch: uint8 HxWxC with the long side = target_length."""
    h, w = image.shape[:2]
    return resize_pil(image, preprocess_shape(h, w, target_length), interpolation, backend)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round and clip a 0..255 float image to uint8 (what the torch path feeds ResizeLongestSide)."""
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def prepare_image(
    image: np.ndarray,
    rule: dict | None,
    image_size: int,
    pixel_mean: Sequence[float] = PIXEL_MEAN,
    pixel_std: Sequence[float] = PIXEL_STD,
    interpolation: str = SAM_INTERPOLATION,
) -> Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]:
    """Any image -> (encoder input 1x3xSxS float32, original_size (h, w), input_size (new_h, new_w))."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise PeftExportError(f"image: expected HxW or HxWxC, got shape {image.shape}")
    rgb = to_uint8(normalize_intensity(image, rule))
    original_size = (int(rgb.shape[0]), int(rgb.shape[1]))
    resized = resize_longest_side(rgb, image_size, interpolation)
    input_size = (int(resized.shape[0]), int(resized.shape[1]))
    mean = np.asarray(pixel_mean, dtype=np.float32)
    std = np.asarray(pixel_std, dtype=np.float32)
    x = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
    # Sam.preprocess: (x - mean) / std in float32, then zero pad bottom/right.
    x[0, :, : input_size[0], : input_size[1]] = ((resized.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    return x, original_size, input_size


def transform_coords(coords: np.ndarray, original_size: Tuple[int, int], image_size: int) -> np.ndarray:
    """ResizeLongestSide.apply_coords: (..., 2) xy in the original image -> the resized frame."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, image_size)
    coords = np.array(coords, dtype=np.float64, copy=True)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def transform_boxes(boxes: np.ndarray, original_size: Tuple[int, int], image_size: int) -> np.ndarray:
    """ResizeLongestSide.apply_boxes: (B, 4) XYXY boxes -> the resized frame."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return transform_coords(boxes.reshape(-1, 2, 2), original_size, image_size).reshape(-1, 4)
