"""Tiles of a large image at full resolution: the tile size and scale, the grid of tiles, and one
tile's encoder input (numpy only).

A tile is a ``tile`` x ``tile`` window of native pixels; the encoder sees it resized by ``scale =
image_size / tile`` (the model's input is always filled by one whole tile). Its inner area (the
tile less ``halo`` pixels on each side that has a neighbour) is what the tile contributes to the
whole image; the halo gives the encoder context, so objects cut by an inner border are still seen
whole. Inner areas step by ``tile - 2 * halo`` and cover the image once; a tile at the image's edge
is shifted inwards to stay full size, so every tile is encoded at the same scale.

Default tile: the training scale recorded in the export (``manifest["training_scale"]``: crops of
``crop_size`` native pixels resized to ``model_input``), so tiles show objects at the size the
adapter learned them; exports without the record: tile = the model input (scale 1).

Intensity: the percentile rule is applied with the whole image's percentiles (``IntensityRange``,
computed once, from a regular subsample above ``INTENSITY_SAMPLE`` pixels) so that every tile
is normalised alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import PeftExportError
from .intensity import _to_channels, check_intensity_rule
from .preprocess import preprocess_shape, resize_pil

DEFAULT_HALO_FRACTION = 0.25  # micro-sam 2: 512-px tiles with a 128-px halo
INTENSITY_SAMPLE = 4_000_000  # pixels used for the whole image's percentiles
SAMPLE_BAND_ROWS = 256  # sampled rows read at a time


@dataclass(frozen=True)
class TileSpec:
    """Tile size and halo in native pixels; ``image_size`` is the model's input."""

    tile: int
    halo: int
    image_size: int

    @property
    def scale(self) -> float:
        return self.image_size / self.tile

    @property
    def step(self) -> int:
        return self.tile - 2 * self.halo


def _scale_record(rec: Any) -> Optional[Dict[str, Any]]:
    return rec if isinstance(rec, dict) and rec.get("crop_size") and rec.get("model_input") else None


def training_scale(manifest: Dict[str, Any], adapter: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The export's record of how training crops met the encoder, or None. An export of several
    adapters records one per adapter (``manifest["adapters"][name]["training_scale"]``): that of
    ``adapter``, or with none chosen the record all adapters share (None when they differ)."""
    entries = manifest.get("adapters") or {}
    if adapter is not None and adapter in entries:
        return _scale_record(entries[adapter].get("training_scale"))
    if entries:
        recs = [_scale_record(e.get("training_scale")) for e in entries.values()]
        return recs[0] if all(r == recs[0] for r in recs) else None
    return _scale_record(manifest.get("training_scale"))


def tile_spec(manifest: Dict[str, Any], tile: Optional[int] = None, halo: Optional[int] = None,
              scale: Optional[float] = None, adapter: Optional[str] = None) -> TileSpec:
    """The tile of ``tile``/``halo``/``scale`` (each optional) for this export (default: the training
    scale of ``adapter``, for exports of several); bad values refused with the option's name."""
    image_size = int(manifest["image_size"])
    for name, v in (("--tile", tile), ("--halo", halo)):
        if v is not None and (isinstance(v, bool) or int(v) != v):
            raise PeftExportError(f"{name}: expected a whole number of pixels, got {v!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise PeftExportError(f"--scale: expected a number > 0, got {scale!r}")
    if tile is not None and scale is not None and abs(int(tile) * scale - image_size) > 0.5:
        raise PeftExportError(f"--tile {tile} and --scale {scale:g} disagree: a tile fills the model input "
                              f"({image_size} px), so tile x scale must be {image_size}; give one of them")
    if tile is None and scale is not None:
        tile = int(round(image_size / scale))
    if tile is None:
        rec = training_scale(manifest, adapter)
        tile = int(round(image_size * int(rec["crop_size"]) / int(rec["model_input"]))) if rec else image_size
        tile = min(tile, image_size)
    tile = int(tile)
    if tile < 16:
        raise PeftExportError(f"--tile: {tile} px is too small (at least 16)")
    if tile > image_size:
        raise PeftExportError(f"--tile: {tile} px is larger than the model input ({image_size} px); tiles are "
                              f"never shrunk (that is the whole-image resize tiling avoids): use --tile <= {image_size}")
    halo = int(round(tile * DEFAULT_HALO_FRACTION)) if halo is None else int(halo)
    if halo < 0 or 2 * halo >= tile:
        raise PeftExportError(f"--halo: {halo} px must be >= 0 and less than half the tile ({tile} px)")
    return TileSpec(tile, halo, image_size)


@dataclass(frozen=True)
class Tile:
    """One tile: ``outer`` (y0, y1, x0, x1) is what the encoder sees, ``inner`` what it contributes."""

    index: Tuple[int, int]
    outer: Tuple[int, int, int, int]
    inner: Tuple[int, int, int, int]

    @property
    def shape(self) -> Tuple[int, int]:
        return self.outer[1] - self.outer[0], self.outer[3] - self.outer[2]

    def inner_in_outer(self) -> Tuple[slice, slice]:
        """The inner area as slices of the tile's own (outer) frame."""
        y0, _, x0, _ = self.outer
        return slice(self.inner[0] - y0, self.inner[1] - y0), slice(self.inner[2] - x0, self.inner[3] - x0)


def _axis(n: int, spec: TileSpec) -> List[Tuple[int, int, int, int]]:
    """(outer0, outer1, inner0, inner1) along one axis of length ``n``."""
    out = []
    for a0 in range(0, n, spec.step):
        a1 = min(a0 + spec.step, n)
        o0 = max(0, min(a0 - spec.halo, n - spec.tile))
        out.append((o0, min(o0 + spec.tile, n), a0, a1))
    return out


class TileGrid:
    """The tiles of an H x W image, row-major."""

    def __init__(self, shape_hw: Tuple[int, int], spec: TileSpec) -> None:
        self.shape = (int(shape_hw[0]), int(shape_hw[1]))
        self.spec = spec
        rows, cols = _axis(self.shape[0], spec), _axis(self.shape[1], spec)
        if self.single:  # one tile: the whole image, encoded as without tiling
            rows, cols = [(0, self.shape[0], 0, self.shape[0])], [(0, self.shape[1], 0, self.shape[1])]
        self.grid_shape = (len(rows), len(cols))
        self.tiles = [Tile((i, j), (r[0], r[1], c[0], c[1]), (r[2], r[3], c[2], c[3]))
                      for i, r in enumerate(rows) for j, c in enumerate(cols)]

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    @property
    def single(self) -> bool:
        """Whether the image fits in one tile (then it is processed as it always was, untiled)."""
        return self.shape[0] <= self.spec.tile and self.shape[1] <= self.spec.tile

    def tile_at(self, x: float, y: float) -> Tile:
        """The tile whose inner area holds image point (x, y)."""
        h, w = self.shape
        i = min(int(min(max(y, 0), h - 1)) // self.spec.step, self.grid_shape[0] - 1)
        j = min(int(min(max(x, 0), w - 1)) // self.spec.step, self.grid_shape[1] - 1)
        return self.tiles[i * self.grid_shape[1] + j]


class IntensityRange:
    """The intensity rule with the whole image's statistics, applied to one tile at a time."""

    def __init__(self, image: Any, rule: Optional[dict]) -> None:
        self.rule = check_intensity_rule(rule)
        self.lo = self.hi = None
        dtype = np.dtype(image.dtype)
        self.keep = self.rule["name"] == "none" or (dtype == np.uint8 and self.rule.get("uint8") == "keep")
        if dtype == bool:
            self.keep = False
            self.lo, self.hi = 0.0, 1.0
        elif not self.keep:
            h, w = image.shape[:2]
            stride = max(1, int(math.ceil(math.sqrt(h * w / INTENSITY_SAMPLE))))
            band = stride * SAMPLE_BAND_ROWS  # read in bands: a strided read of a whole zarr or memory map
            sample = np.concatenate([_to_channels(np.asarray(image[y:y + band:stride, ::stride]))  # holds all of it
                                     for y in range(0, h, band)]).astype(np.float64)
            values = sample[np.isfinite(sample)]
            if values.size:
                lo, hi = np.percentile(values, [self.rule["low"], self.rule["high"]])
                if hi <= lo:
                    lo, hi = float(values.min()), float(values.max())
                self.lo, self.hi = float(lo), float(hi)

    def record(self) -> Dict[str, Any]:
        """JSON-able statistics (a resumed or distributed run normalises every tile alike)."""
        return {"rule": self.rule, "lo": self.lo, "hi": self.hi, "keep": self.keep}

    @classmethod
    def from_record(cls, rec: Dict[str, Any]) -> "IntensityRange":
        self = cls.__new__(cls)
        self.rule, self.lo, self.hi, self.keep = rec["rule"], rec["lo"], rec["hi"], rec["keep"]
        return self

    def to_uint8(self, tile: np.ndarray) -> np.ndarray:
        """A tile (HxW or HxWxC) -> uint8 HxWx3, as ``normalize_intensity`` + ``to_uint8`` would map it
        with these statistics."""
        chans = _to_channels(np.asarray(tile))
        out = chans.astype(np.float32)
        if self.keep:
            out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
        elif self.lo is None or self.hi <= self.lo:
            out = np.zeros_like(out)
        else:
            finite = np.isfinite(out)
            out = ((out.astype(np.float64) - self.lo) * (255.0 / (self.hi - self.lo))).astype(np.float32)
            out[~finite] = 0.0
        np.clip(out, 0.0, 255.0, out=out)
        if out.shape[-1] == 1:
            out = np.repeat(out, 3, axis=-1)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _encoder_input(rgb: np.ndarray, new: Tuple[int, int], size: int, pixel_mean: Sequence[float],
                   pixel_std: Sequence[float], interpolation: str) -> np.ndarray:
    """uint8 HxWx3 resized to ``new``, normalised and padded into the 1x3xSxS encoder input."""
    resized = rgb if new == rgb.shape[:2] else resize_pil(rgb, new, interpolation)
    x = np.zeros((1, 3, size, size), np.float32)
    mean, std = np.asarray(pixel_mean, np.float32), np.asarray(pixel_std, np.float32)
    x[0, :, : new[0], : new[1]] = ((resized.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    return x


def whole_rgb(image: Any, intensity: IntensityRange, image_size: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The whole image as uint8 H' x W' x 3, read with a stride that keeps at least twice the model
    input per side (segment-everything's coarse layer, SAM's and SAM 2's), and its full size (h, w)."""
    h, w = (int(v) for v in image.shape[:2])
    stride = max(1, max(h, w) // (2 * image_size))
    return intensity.to_uint8(np.asarray(image[::stride, ::stride])), (h, w)


def prepare_whole(image: Any, intensity: IntensityRange, image_size: int, pixel_mean: Sequence[float],
                  pixel_std: Sequence[float], interpolation: str
                  ) -> Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]:
    """The whole image as the encoder sees an ordinary image (longest side resized to the model
    input), read with a stride that keeps at least twice the model input per side: the encoder
    input, original_size (the full image, so masks come back at full resolution), input_size."""
    rgb, (h, w) = whole_rgb(image, intensity, image_size)
    new = preprocess_shape(h, w, image_size)
    return _encoder_input(rgb, new, image_size, pixel_mean, pixel_std, interpolation), (h, w), new


def prepare_tile(pixels: np.ndarray, intensity: IntensityRange, spec: TileSpec, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], interpolation: str) -> Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]:
    """One tile's native pixels -> (encoder input 1x3xSxS, original_size, input_size).

    The longest side of a tile is ``spec.tile`` (the grid keeps tiles full size; only an image
    narrower than a tile gives a narrower one), so resizing the longest side to the model input
    is the tile's scale, and the session's prompt and mask transforms apply unchanged.
    """
    rgb = intensity.to_uint8(pixels)
    h, w = rgb.shape[:2]
    size = spec.image_size
    # a tile narrower than spec.tile on both sides only occurs when the image is: scale it as a full tile
    new = preprocess_shape(h, w, size) if max(h, w) == spec.tile else (round(h * spec.scale), round(w * spec.scale))
    x = _encoder_input(rgb, (int(new[0]), int(new[1])), size, pixel_mean, pixel_std, interpolation)
    return x, (h, w), (int(new[0]), int(new[1]))
