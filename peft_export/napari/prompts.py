"""Prompt layers -> ``SamSession.predict``: the current slice's points and box, and the iterative
decoding rule the web page and SamPredictor use.

Pure numpy (no Qt, no napari), so the widget, the tests and the benchmark share it:

- points: napari data coordinates (row, col) of the image layer; SAM takes x, y = col, row;
- box: the last rectangle on the current slice (napari's four corners -> XYXY);
- one click or a box alone is ambiguous: the best of the three multimask outputs is shown;
  more prompts give the single-mask output (SamPredictor's advice, the web page's rule);
- the shown mask's low-res logits are fed back as ``mask_input`` when the new prompts extend
  the previous ones (a point or a box added); a prompt removed or moved starts afresh, so
  a mask never keeps a hint from a prompt that is gone;
- an image larger than the model input is a ``TiledImage`` (``runtime.tiled``): the prompts go
  to the tile whose inner area holds them, at full resolution (as ``TiledImage.predict``), and
  the logits are fed back only while the object stays in the same tile. The caller passes that
  tile's embedding (computed in a worker), so decoding never runs the encoder, and the mask
  covers the tile's window only (``Decoded.window``), never the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class Prompts:
    """One object's prompts on one slice, in SamSession.predict's conventions."""

    coords: np.ndarray  # (N, 2) x, y pixels
    labels: np.ndarray  # (N,) 1 positive, 0 negative
    box: Optional[np.ndarray] = None  # (4,) XYXY

    @property
    def empty(self) -> bool:
        return len(self.coords) == 0 and self.box is None

    def extends(self, previous: Optional["Prompts"]) -> bool:
        """True when these prompts are ``previous`` plus more (the same points first, same box or a new one)."""
        if previous is None or previous.empty:
            return False
        n = len(previous.coords)
        if len(self.coords) < n or not np.array_equal(self.coords[:n], previous.coords):
            return False
        if not np.array_equal(self.labels[:n], previous.labels):
            return False
        if previous.box is not None and (self.box is None or not np.array_equal(self.box, previous.box)):
            return False
        return len(self.coords) > n or (self.box is not None and previous.box is None)


def on_slice(data: np.ndarray, leading: Sequence[int]) -> np.ndarray:
    """Rows of (K, ndim) coordinates whose leading (non-spatial) coordinates round to ``leading``."""
    data = np.asarray(data, dtype=np.float64).reshape(-1, len(leading) + 2)
    if not len(leading):
        return np.ones(len(data), bool)
    return np.all(np.round(data[:, : len(leading)]) == np.asarray(leading), axis=1)


def slice_prompts(points: np.ndarray, positive: Sequence[bool], rectangles: Sequence[np.ndarray],
                  leading: Sequence[int] = ()) -> Prompts:
    """Points (K, ndim) with their polarity and rectangles (4, ndim) each -> this slice's Prompts."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, len(leading) + 2)
    keep = on_slice(points, leading)
    coords = points[keep][:, ::-1][:, :2].copy()  # (row, col) -> (x, y)
    labels = np.asarray(positive, dtype=bool).reshape(-1)[keep].astype(np.int64)
    box = None
    for rect in rectangles:  # the last rectangle on this slice wins
        rect = np.asarray(rect, dtype=np.float64)
        if rect.ndim != 2 or rect.shape[1] != len(leading) + 2 or not on_slice(rect, leading).all():
            continue
        rows, cols = rect[:, -2], rect[:, -1]
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()])
    return Prompts(coords, labels, box)


def prompted_slices(points: np.ndarray, rectangles: Sequence[np.ndarray], n_leading: int) -> list:
    """The leading indices (sorted tuples) of every slice holding a point or a rectangle."""
    found = {tuple(int(v) for v in row) for row in np.round(np.asarray(points, np.float64).reshape(
        -1, n_leading + 2)[:, :n_leading])}
    for rect in rectangles:
        rect = np.asarray(rect, dtype=np.float64)
        if rect.ndim == 2 and rect.shape[1] == n_leading + 2:
            found.add(tuple(int(v) for v in np.round(rect[0, :n_leading])))
    return sorted(found)


def same_prompts(a: Optional[Prompts], b: Optional[Prompts]) -> bool:
    """The same points (in order, same polarity) and the same box."""
    if a is None or b is None:
        return False
    boxes = (a.box is None and b.box is None) or (a.box is not None and b.box is not None
                                                   and np.array_equal(a.box, b.box))
    return boxes and np.array_equal(a.coords, b.coords) and np.array_equal(a.labels, b.labels)


def clip_to_image(prompts: Prompts, shape: Tuple[int, int]) -> Prompts:
    """Points outside the image are dropped and a box is clipped to it (napari lets a click land
    anywhere on the canvas; SamSession refuses coordinates outside the image)."""
    h, w = shape
    inside = (prompts.coords[:, 0] >= 0) & (prompts.coords[:, 0] <= w) & (prompts.coords[:, 1] >= 0) & (
        prompts.coords[:, 1] <= h)
    box = prompts.box
    if box is not None:
        box = np.clip(box, 0, [w, h, w, h])
        if box[2] <= box[0] or box[3] <= box[1]:
            box = None
    return Prompts(prompts.coords[inside], prompts.labels[inside], box)


def uses_multimask(prompts: Prompts) -> bool:
    """One point alone or a box alone: ambiguous, show the best of SAM's three masks."""
    n = len(prompts.coords)
    return (n == 1 and prompts.box is None) or (n == 0 and prompts.box is not None)


@dataclass
class Decoded:
    """The shown mask (of ``window`` (y0, y1, x0, x1) in image pixels, bool), its predicted IoU,
    which output it is, and its low-res logits."""

    mask: np.ndarray
    iou: float
    index: int
    low_res: np.ndarray
    window: Tuple[int, int, int, int]


class ClickDecoder:
    """Decodes one object's prompts on one embedding, feeding the last low-res logits back."""

    def __init__(self, session: Any, embedding: Any, adapter: Optional[str] = None) -> None:
        self.session, self.embedding, self.adapter = session, embedding, adapter
        self._last: Optional[Prompts] = None
        self._low: Optional[np.ndarray] = None
        self._tile: Any = None

    @property
    def tiled(self) -> bool:
        """Whether the embedding is a ``TiledImage`` (encoded tile by tile on demand)."""
        return hasattr(self.embedding, "predict_window")

    def reset(self) -> None:
        self._last, self._low, self._tile = None, None, None

    @staticmethod
    def _args(prompts: Prompts) -> dict:
        has = len(prompts.coords) > 0
        return {"point_coords": prompts.coords if has else None, "point_labels": prompts.labels if has else None,
                "box": prompts.box}

    def tile_for(self, prompts: Prompts) -> Any:
        """The tile ``prompts`` go to (tiled images only; refuses prompts that do not fit one tile)."""
        a = self._args(prompts)
        return self.embedding.route(a["point_coords"], a["point_labels"], a["box"])

    def decode(self, prompts: Prompts, tile_embedding: Any = None) -> Optional[Decoded]:
        """The mask for ``prompts`` (None when there are none); on a tiled image ``tile_embedding``
        is the embedding of ``tile_for(prompts)``."""
        if prompts.empty:
            self.reset()
            return None
        tile, embedding = None, self.embedding
        if self.tiled:
            tile, embedding = self.tile_for(prompts), tile_embedding
            if embedding is None:
                raise ValueError("decode: a tiled image needs the embedding of the prompts' tile")
            window = tile.outer
        else:
            h, w = self.embedding.original_size
            window = (0, int(h), 0, int(w))
        y0, _, x0, _ = window
        local = self._args(prompts)
        if tile is not None:  # the tile's own pixel coordinates (TiledImage.predict_window does the same)
            shift = np.array([x0, y0], np.float64)
            local["point_coords"] = None if local["point_coords"] is None else local["point_coords"] - shift
            local["box"] = None if local["box"] is None else local["box"] - np.tile(shift, 2)
        mask_input = self._low if prompts.extends(self._last) and tile == self._tile else None
        multi = uses_multimask(prompts)
        # low-res only: of the three masks of a click only the shown one is upsampled (below)
        _, iou, low = self.session.predict(**local, mask_input=mask_input, multimask_output=multi,
                                           embedding=embedding, adapter=self.adapter, masks=False)
        best = int(np.argmax(iou)) if multi else 0
        self._last, self._low, self._tile = prompts, low[best : best + 1], tile
        mask = self.session.upsample_masks(self._low, embedding=embedding, adapter=self.adapter)[0] > 0.0
        return Decoded(mask, float(iou[best]), best + 1 if multi else 0, self._low, window)
