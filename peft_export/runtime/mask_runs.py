"""Thresholded upsampled masks without upsampling the whole image: exact counts and row runs.

SamAutomaticMaskGenerator upsamples every candidate's logits to the full image and then
only compares them with three numbers (the stability score's ``threshold ± offset`` and the
mask threshold). Bilinear upsampling is a convex combination of the low-res values an
output pixel reads, so

- outside the output rows / columns that read a low-res value above the lowest threshold,
  no pixel can exceed it: only a box around the mask is upsampled;
- inside, fast float32 values (``MaskUpsampler.plain``) decide every pixel farther than
  their rounding error from a threshold, and the few pixels closer are recomputed exactly
  (``MaskUpsampler.exact``, bit-for-bit torch).

A mask is kept as horizontal runs (row, start, end exclusive) in image coordinates: memory
grows with the mask's outline, not with the image (a 4000x4000 image does not make each
candidate a 16 MB array).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from .postprocess import MaskUpsampler

# MaskUpsampler.plain (weights of both resizes multiplied, two float32 matrix products of at
# most 4 non-zero terms each) and torch's 4 fused interpolations are each within ~12 float32
# ulps of the exact value, so they differ by less than ~2e-6 * max|logit|: 1e-4 leaves 50x room,
# and the pixels it sends to the exact path are still a thin band along each threshold.
_ROUNDING_MARGIN = 1e-4
_CHUNK_PIXELS = 1 << 20  # rows are upsampled in chunks of about this many pixels


@dataclass(frozen=True)
class MaskRuns:
    """A binary mask as horizontal runs: ``rows[k]``, columns ``starts[k] .. ends[k] - 1``."""

    rows: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @property
    def area(self) -> int:
        return int((self.ends - self.starts).sum())

    def box(self) -> np.ndarray:
        """XYXY with inclusive max (amg.batched_mask_to_box); [0, 0, 0, 0] when empty."""
        if len(self.rows) == 0:
            return np.zeros(4, np.int64)
        return np.array([self.starts.min(), self.rows.min(), self.ends.max() - 1, self.rows.max()], np.int64)

    def to_mask(self, size: Tuple[int, int]) -> np.ndarray:
        mask = np.zeros(size[0] * size[1], dtype=bool)
        paint_runs(mask, self.rows * size[1] + self.starts, self.ends - self.starts, True)
        return mask.reshape(size)

    @staticmethod
    def from_mask(mask: np.ndarray, row0: int = 0, col0: int = 0) -> "MaskRuns":
        rows, starts, ends = runs_of(mask)
        return MaskRuns(rows + row0, starts + col0, ends + col0)

    @staticmethod
    def concat(parts: Sequence["MaskRuns"]) -> "MaskRuns":
        if not parts:
            return MaskRuns(*(np.zeros(0, np.int64) for _ in range(3)))
        return MaskRuns(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("rows", "starts", "ends")))


def runs_of(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True pixels of a 2D bool array: (row, start, end exclusive), raster order."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1).ravel()
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    width = w + 1
    return starts // width, starts % width, ends % width


def paint_runs(flat: np.ndarray, flat_start: np.ndarray, lengths: np.ndarray, values) -> None:
    """Set ``flat[s : s + n]`` for each run (value per run, or one value for all)."""
    total = int(lengths.sum())
    if total == 0:
        return
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat[np.repeat(flat_start, lengths) + offsets] = np.repeat(values, lengths) if np.ndim(values) else values


def _span(lo: np.ndarray, hi: np.ndarray, first: int, last: int) -> Tuple[int, int]:
    """Output indices [a, b) whose low-res span [lo, hi] meets [first, last] (lo, hi non-decreasing)."""
    return int(np.searchsorted(hi, first, side="left")), int(np.searchsorted(lo, last, side="right"))


def threshold_upsampled(
    up: MaskUpsampler, low: np.ndarray, thresholds: Sequence[float], mask_threshold: float
) -> Tuple[np.ndarray, MaskRuns]:
    """Counts of upsampled pixels > each threshold, and the runs of pixels > ``mask_threshold``.

    Exactly what thresholding ``Sam.postprocess_masks`` (torch, CPU) of ``low`` gives.
    """
    low = np.asarray(low, np.float32)
    cuts = np.asarray(list(thresholds) + [mask_threshold], np.float32)
    counts = np.zeros(len(cuts), np.int64)
    scale = float(np.abs(low).max()) if low.size else 0.0
    finite = np.isfinite(scale)
    margin = np.float32(_ROUNDING_MARGIN * scale) if finite else np.float32(np.inf)
    lowest = float(cuts.min())
    # Low-res values that could lift an output pixel above the lowest threshold.
    live = low > lowest - margin if finite else np.ones(low.shape, bool)
    if not live.any():
        return counts[:-1], MaskRuns.concat([])
    live_rows, live_cols = np.flatnonzero(live.any(1)), np.flatnonzero(live.any(0))
    y0, y1 = _span(*up.row_span, live_rows[0], live_rows[-1])
    x0, x1 = _span(*up.col_span, live_cols[0], live_cols[-1])
    if y0 >= y1 or x0 >= x1:  # only the padding beyond the image is live
        return counts[:-1], MaskRuns.concat([])
    parts = []
    step = max(1, _CHUNK_PIXELS // max(1, x1 - x0))
    for r0 in range(y0, y1, step):
        r1 = min(y1, r0 + step)
        values = up.plain(low, (r0, r1), (x0, x1))
        near = np.zeros(values.shape, bool)
        for c in cuts:
            near |= np.abs(values - c) <= margin
        if near.any():  # recompute what rounding could decide either way, bit for bit
            ys, xs = np.nonzero(near)
            values[ys, xs] = up.exact(low, ys + r0, xs + x0)
        for k, c in enumerate(cuts):
            above = values > c
            counts[k] += int(np.count_nonzero(above))
            if k == len(cuts) - 1:
                parts.append(MaskRuns.from_mask(above, r0, x0))
    return counts[:-1], MaskRuns.concat(parts)
