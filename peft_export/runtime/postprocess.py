"""Mask postprocessing in numpy, matching segment_anything's Sam.postprocess_masks."""

from __future__ import annotations

from typing import Tuple

import numpy as np


def _axis_weights(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear, align_corners=False (half-pixel centres)."""
    # PyTorch computes these in float32 for float32 inputs (opmath of float is float).
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    lam1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    return i0, i1, lam0, lam1


def resize_bilinear(
    x: np.ndarray, size_hw: Tuple[int, int], crop_hw: Tuple[int, int] | None = None
) -> np.ndarray:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` on (..., H, W) float arrays.

    ``crop_hw`` returns only the top-left (h, w) of the result, without computing the rest.
    """
    x = np.asarray(x, dtype=np.float32)
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    keep_h, keep_w = (out_h, out_w) if crop_hw is None else (int(crop_hw[0]), int(crop_hw[1]))
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x[..., :keep_h, :keep_w].copy()
    i0, i1, l0, l1 = (a[:keep_w] for a in _axis_weights(in_w, out_w))
    x = x[..., i0] * l0 + x[..., i1] * l1
    j0, j1, m0, m1 = (a[:keep_h] for a in _axis_weights(in_h, out_h))
    x = x[..., j0, :] * m0[:, None] + x[..., j1, :] * m1[:, None]
    return x.astype(np.float32, copy=False)


def postprocess_masks(
    low_res: np.ndarray,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    image_size: int,
) -> np.ndarray:
    """Sam.postprocess_masks: (..., 4g, 4g) logits -> upsample to SxS, crop to input_size, upsample to original_size."""
    # Only the crop of the SxS upsampling is computed; its values are the same.
    masks = resize_bilinear(low_res, (image_size, image_size), crop_hw=input_size)
    return resize_bilinear(masks, original_size)
