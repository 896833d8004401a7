"""SAM 2's image preprocessing and prompt frame in numpy (``sam2.utils.transforms.SAM2Transforms``).

SAM 2 does not keep the aspect ratio: ``ToTensor`` (uint8 / 255 in float32), ``Resize((S, S))`` on that
float image (torch's bilinear with antialias, what torchvision does for tensors), then ``Normalize``
with ImageNet's mean and std. Prompts scale the same way (x * S / W, y * S / H) and masks come back
from the (4g, 4g) logits with one bilinear resize to (H, W).

The resize is torch's separable antialiased filter (``upsample_bilinear2d_aa``: a triangle of support
max(1, in/out) around each output centre, weights normalised per pixel, width first, then height),
in float32 like torch's; it agrees with torch to float rounding.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from ..errors import PeftExportError
from .intensity import normalize_intensity
from .preprocess import to_uint8

SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)


def aa_bilinear_weights(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per output index: the first input index and the (out, k) float32 weights of torch's antialiased
    bilinear (align_corners=False)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    k = int(xsize.max())
    taps = np.arange(k)
    w = np.maximum(0.0, 1.0 - np.abs((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * invscale))
    w = np.where(taps[None, :] < xsize[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), w)
    return xmin, w.astype(np.float32)


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    xmin, w = aa_bilinear_weights(in_size, out_size)
    src = np.moveaxis(x, axis, 0)
    out = np.zeros((out_size,) + src.shape[1:], np.float32)
    extra = (1,) * (src.ndim - 1)
    for t in range(w.shape[1]):
        wt = w[:, t]
        if not wt.any():
            continue
        out += src[np.minimum(xmin + t, in_size - 1)] * wt.reshape((-1,) + extra)
    return np.moveaxis(out, 0, axis)


def resize_antialias(x: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """``F.interpolate(x, size, mode="bilinear", antialias=True)`` of an (H, W, C) float32 image."""
    x = np.asarray(x, np.float32)
    return _resize_axis(_resize_axis(x, int(size_hw[1]), 1), int(size_hw[0]), 0)


def prepare_sam2_image(image: np.ndarray, rule: dict | None, image_size: int,
                       pixel_mean: Sequence[float] = SAM2_PIXEL_MEAN, pixel_std: Sequence[float] = SAM2_PIXEL_STD
                       ) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Any image -> (encoder input (1, 3, S, S) float32, original size (h, w))."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise PeftExportError(f"image: expected HxW or HxWxC, got shape {image.shape}")
    rgb = to_uint8(normalize_intensity(image, rule))
    original_size = (int(rgb.shape[0]), int(rgb.shape[1]))
    return sam2_encoder_input(rgb, image_size, pixel_mean, pixel_std), original_size


def sam2_encoder_input(rgb: np.ndarray, image_size: int, pixel_mean: Sequence[float] = SAM2_PIXEL_MEAN,
                       pixel_std: Sequence[float] = SAM2_PIXEL_STD) -> np.ndarray:
    """uint8 H x W x 3 -> the encoder input (1, 3, S, S): / 255, resized to S x S (aspect ratio not kept),
    ImageNet-normalised. A tile of a large image (``runtime.tiling``) goes through here as a whole image does."""
    x = resize_antialias(rgb.astype(np.float32) / np.float32(255.0), (image_size, image_size))
    x = (x - np.asarray(pixel_mean, np.float32)) / np.asarray(pixel_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def to_sam2_frame(xy: np.ndarray, original_size: Tuple[int, int], image_size: int, dtype=np.float32) -> np.ndarray:
    """(..., 2) x, y pixels of the original image -> the S x S model frame (x / W * S, y / H * S), in
    ``dtype`` (float32 as SAM2ImagePredictor.predict, float64 as its mask generator's point grid)."""
    h, w = original_size
    xy = np.array(xy, dtype=dtype, copy=True)
    xy[..., 0] = xy[..., 0] / dtype(w) * dtype(image_size)
    xy[..., 1] = xy[..., 1] / dtype(h) * dtype(image_size)
    return xy
