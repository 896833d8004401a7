"""Mask postprocessing in numpy: segment_anything's Sam.postprocess_masks, fast or bit-exact.

``Sam.postprocess_masks`` upsamples low-res logits bilinearly (align_corners=False) to SxS,
crops the valid input_size, and resizes that to the original image size. PyTorch's CPU
kernel computes each source coordinate as fma(scale, dst + 0.5, -0.5) and each
interpolation as fma(x0, w0, x1 * w1), width first, then height: its vectorised AVX2 /
AVX-512 builds contract these expressions into fused multiply-adds (the tests check this
against the installed torch). ``postprocess_masks`` evaluates the same formulas in plain
float32 (within a few float32 ulps of torch); ``MaskUpsampler.exact`` evaluates them with a
correctly rounded fused multiply-add (``fma32``), bit for bit what torch computes, at any
set of pixels. Thresholded masks use the fast values and recompute only the pixels that lie
within rounding distance of the threshold (see ``mask_runs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

_F32 = np.float32
_SMALL_OUTPUT = 128  # torch's _use_channels_last_kernel_2d: output H + W at most this
# OpenBLAS runs a product of m*n*k <= 4 * 65536 multiply-adds in the calling thread.
_TILE_MACS = 250_000


def fma32(a, b, c) -> np.ndarray:
    """``a * b + c`` of float32 values, rounded once to float32 like a fused multiply-add.

    The product is exact in float64; the sum is rounded to odd in float64 (its error is
    recovered exactly by TwoSum), and a round-to-odd value with more than 2 extra bits
    rounds to float32 as the exact sum would.
    """
    x = np.multiply(np.asarray(a, _F32), np.asarray(b, _F32), dtype=np.float64)
    y = np.asarray(c, _F32).astype(np.float64)
    s = x + y
    back = s - x
    err = (x - (s - back)) + (y - back)
    inexact = (err != 0) & np.isfinite(s)
    bits = np.ascontiguousarray(s).view(np.int64)
    # Truncate toward zero (one step back when rounding went away from zero), then set the last bit.
    bits = (bits - (inexact & ((err > 0) != (s > 0)))) | inexact
    return bits.view(np.float64).astype(_F32)


@dataclass(frozen=True)
class AxisMap:
    """One axis of a bilinear resize: output index k reads ``w0[k]*x[i0[k]] + w1[k]*x[i1[k]]``."""

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray

    @property
    def identity(self) -> bool:
        return bool(len(self.i0) and np.array_equal(self.i0, np.arange(len(self.i0))) and not self.w1.any())

    def part(self, start: int, stop: int) -> "AxisMap":
        """Outputs [start, stop) (a crop of the resized axis)."""
        return AxisMap(self.i0[start:stop], self.i1[start:stop], self.w0[start:stop], self.w1[start:stop])


def axis_map(in_size: int, out_size: int) -> AxisMap:
    """PyTorch's source indices and weights for bilinear, align_corners=False, float32."""
    if in_size == out_size:  # torch copies
        idx = np.arange(out_size)
        return AxisMap(idx, idx, np.ones(out_size, _F32), np.zeros(out_size, _F32))
    scale = np.full(out_size, _F32(in_size) / _F32(out_size), _F32)
    dst = np.arange(out_size, dtype=_F32) + _F32(0.5)
    src = np.maximum(fma32(scale, dst, np.full(out_size, -0.5, _F32)), _F32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(_F32), _F32(0.0), _F32(1.0)).astype(_F32)
    w0 = (_F32(1.0) - w1).astype(_F32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return AxisMap(i0, i1, w0, w1)


def _lerp_plain(x0: np.ndarray, x1: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    return x0 * w0 + x1 * w1


def _lerp_exact(x0: np.ndarray, x1: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    return fma32(x0, w0, x1 * w1)


def resize_bilinear(
    x: np.ndarray, size_hw: Tuple[int, int], crop_hw: Tuple[int, int] | None = None
) -> np.ndarray:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` on (..., H, W) float arrays.

    ``crop_hw`` returns only the top-left (h, w) of the result, without computing the rest.
    Plain float32: within a few ulps of torch (``MaskUpsampler.exact`` is bit-exact).
    """
    x = np.asarray(x, dtype=_F32)
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    keep_h, keep_w = (out_h, out_w) if crop_hw is None else (int(crop_hw[0]), int(crop_hw[1]))
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x[..., :keep_h, :keep_w].copy()
    cols, rows = axis_map(in_w, out_w).part(0, keep_w), axis_map(in_h, out_h).part(0, keep_h)
    x = _lerp_plain(x[..., cols.i0], x[..., cols.i1], cols.w0, cols.w1)
    x = _lerp_plain(x[..., rows.i0, :], x[..., rows.i1, :], rows.w0[:, None], rows.w1[:, None])
    return x.astype(_F32, copy=False)


def postprocess_masks(
    low_res: np.ndarray,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    image_size: int,
) -> np.ndarray:
    """Sam.postprocess_masks: (..., 4g, 4g) logits -> upsample to SxS, crop to input_size, upsample to original_size."""
    low_res = np.asarray(low_res, dtype=_F32)
    lead = low_res.shape[:-2]
    if int(np.prod(lead, dtype=np.int64)) > 1:
        # One mask at a time: its temporaries stay in cache (3 masks of 1024² at once took 66 ms, one 10 ms).
        flat = low_res.reshape(-1, *low_res.shape[-2:])
        first = postprocess_masks(flat[0], input_size, original_size, image_size)
        out = np.empty((len(flat), *first.shape), dtype=_F32)
        out[0] = first
        for i in range(1, len(flat)):
            out[i] = postprocess_masks(flat[i], input_size, original_size, image_size)
        return out.reshape(*lead, *first.shape)
    # Only the crop of the SxS upsampling is computed; its values are the same.
    masks = resize_bilinear(low_res, (image_size, image_size), crop_hw=input_size)
    return resize_bilinear(masks, original_size)


class MaskUpsampler:
    """``Sam.postprocess_masks`` for one image geometry, evaluated on parts of the image.

    Stage 1 resizes the low-res (L, L) logits to SxS (only the input_size crop is read),
    stage 2 resizes that crop to the original (H, W). Both stages of an axis together are
    an (output, L) matrix with at most 4 non-zero weights per row (``rows``, ``cols``), so a
    block of the image is R @ low @ Cᵀ. It is computed tile by tile (``_TILE_MACS``): each
    tile reads a small window of ``low``, and products that small run in one BLAS thread,
    which a busy machine cannot stall. ``row_span``/``col_span`` give, per output row /
    column, the first and last low-res row / column it reads.
    """

    def __init__(self, low_size: int, input_size: Tuple[int, int], original_size: Tuple[int, int], image_size: int):
        self.low_size = int(low_size)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.rows1 = axis_map(low_size, image_size).part(0, int(input_size[0]))
        self.cols1 = axis_map(low_size, image_size).part(0, int(input_size[1]))
        self.rows2 = axis_map(int(input_size[0]), self.original_size[0])
        self.cols2 = axis_map(int(input_size[1]), self.original_size[1])
        self.identity2 = self.rows2.identity and self.cols2.identity
        # torch sends small outputs (H + W <= 128) to its channels-last kernel, which rounds differently.
        self.small1 = 2 * int(image_size) <= _SMALL_OUTPUT
        self.small2 = sum(self.original_size) <= _SMALL_OUTPUT
        self.rows = _composite(self.rows1, self.rows2, self.low_size)
        self.cols = _composite(self.cols1, self.cols2, self.low_size)
        self.row_span = (self.rows1.i0[self.rows2.i0], self.rows1.i1[self.rows2.i1])
        self.col_span = (self.cols1.i0[self.cols2.i0], self.cols1.i1[self.cols2.i1])

    def plain(self, low: np.ndarray, rows: Tuple[int, int], cols: Tuple[int, int]) -> np.ndarray:
        """Float32 upsampled logits of output rows [r0, r1) x columns [c0, c1) of one (L, L) mask.

        Within ~1e-6 * max|low| of torch's values (a few float32 roundings of weights that sum to 1).
        """
        (y0, y1), (x0, x1) = rows, cols
        low = np.asarray(low, _F32)
        rows_t, r0, tile = self._tiles(y0, y1, self.row_span, self.rows)
        cols_t, c0, _ = self._tiles(x0, x1, self.col_span, self.cols, tile)
        window = low[(r0[:, None] + np.arange(rows_t.shape[-1]))[:, None, :, None],
                     (c0[:, None] + np.arange(cols_t.shape[-1]))[None, :, None, :]]
        out = (rows_t[:, None] @ window) @ cols_t[None].transpose(0, 1, 3, 2)  # (tiles y, tiles x, T, T)
        n_y, n_x = out.shape[:2]
        return out.transpose(0, 2, 1, 3).reshape(n_y * tile, n_x * tile)[: y1 - y0, : x1 - x0]

    def _tiles(self, a0: int, a1: int, span, weights: np.ndarray, tile: int = 0):
        """Output indices [a0, a1) cut into tiles: per tile its weights (n, T, K) over K low-res
        indices starting at start[n], and T (chosen so that each tile product stays small)."""
        if not tile:
            per_low = len(weights) / max(1, int(span[1][-1]) + 1)  # output pixels per low-res pixel
            tile = max([32] + [t for t in (48, 64, 96, 128, 160, 192, 256) if t * t * (t / per_low + 4) <= _TILE_MACS])
        n = -(-(a1 - a0) // tile)
        idx = np.minimum(a0 + np.arange(n * tile).reshape(n, tile), a1 - 1)
        lo, hi = span[0][idx[:, 0]], span[1][idx[:, -1]]
        k = min(int((hi - lo).max()) + 1, weights.shape[1])
        start = np.minimum(lo, weights.shape[1] - k)
        return weights[idx[:, :, None], start[:, None, None] + np.arange(k)], start, tile

    def exact(self, low: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Upsampled logits at pixels (ys[k], xs[k]) of one (L, L) mask, bit-exact with torch."""
        low = np.asarray(low, _F32)

        def stage1(r: np.ndarray, c: np.ndarray) -> np.ndarray:
            return _bilinear_at(lambda a, b: low[a, b], self.rows1, self.cols1, r, c, self.small1)

        if self.identity2:
            return stage1(ys, xs)
        return _bilinear_at(stage1, self.rows2, self.cols2, ys, xs, self.small2)

    def exact_full(self, low: np.ndarray) -> np.ndarray:
        """All (H, W) upsampled logits of one mask, bit-exact (slow; for checks)."""
        h, w = self.original_size
        ys, xs = np.divmod(np.arange(h * w), w)
        return self.exact(low, ys, xs).reshape(h, w)


def _bilinear_at(source, rows: AxisMap, cols: AxisMap, ys: np.ndarray, xs: np.ndarray, small: bool) -> np.ndarray:
    """One torch bilinear resize at pixels (ys, xs); ``source(r, c)`` gives the input values."""
    r0, r1, c0, c1 = rows.i0[ys], rows.i1[ys], cols.i0[xs], cols.i1[xs]
    h0, h1, w0, w1 = rows.w0[ys], rows.w1[ys], cols.w0[xs], cols.w1[xs]
    if small:  # channels-last kernel: four products with weights h*w, summed left to right
        v = fma32(source(r0, c0), h0 * w0, source(r0, c1) * (h0 * w1))
        v = fma32(source(r1, c0), h1 * w0, v)
        return fma32(source(r1, c1), h1 * w1, v)
    t0 = _lerp_exact(source(r0, c0), source(r0, c1), w0, w1)
    t1 = _lerp_exact(source(r1, c0), source(r1, c1), w0, w1)
    return _lerp_exact(t0, t1, h0, h1)


def _composite(stage1: AxisMap, stage2: AxisMap, low_size: int) -> np.ndarray:
    """Both resizes of one axis as an (output, low_size) float32 matrix."""
    m = np.zeros((len(stage2.i0), low_size), np.float64)
    rows = np.arange(len(stage2.i0))
    for a, wa in ((stage2.i0, stage2.w0), (stage2.i1, stage2.w1)):
        for b, wb in ((stage1.i0, stage1.w0), (stage1.i1, stage1.w1)):
            np.add.at(m, (rows, b[a]), wa.astype(np.float64) * wb[a])
    return m.astype(_F32)
