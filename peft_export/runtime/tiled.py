"""TiledImage: a large image segmented tile by tile at full resolution (``runtime.tiling``), never
resized whole. Made by ``SamSession.tiled(image, tile=, halo=, scale=)`` or ``set_image(..., tile=)``.

- Prompts (image coordinates) go to the tile whose inner area holds the box's centre, or else
  the first positive point (first point); every prompt must lie inside that tile's window. A box
  larger than one tile is refused with both sizes (a larger ``tile`` or a crop is the answer:
  shrinking it silently would change what the model sees).
- ``instance_maps`` writes each tile's inner area of the decoder's three maps into a (3, H, W)
  array (numpy, or a zarr/memmap given as ``out``); ``segment_instances`` then runs the seeded
  watershed block by block (``runtime.blockwise``) so objects crossing tile borders come out whole.
- ``segment_everything`` treats tiles as SAM's crop layers do, with the whole image as layer 0:
  the whole image at the model input (``prepare_whole``, masks upsampled to full resolution)
  gives the objects no tile holds whole; in each tile, masks touching an edge that is not the
  image's edge are dropped (a neighbour sees them whole, up to about the halo across the border);
  box NMS over all layers removes duplicates, preferring a tile's mask to the coarse layer's (SAM
  prefers the smaller crop). The halo must be at least ``min_everything_halo(tile)``.

An image that fits in one tile is encoded whole, exactly as without tiling. Tiles are encoded by the
session's ``encode_tile`` (the coarse layer by ``encode_whole``): SAM's and SAM 2's sessions each prepare a
tile their own way and return the embedding their own calls take, so this module serves both.
Embeddings are computed on demand, the last few kept (``cache``): memory does not grow with the image.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..errors import PeftExportError
from .blockwise import instances_blockwise
from .embedding import MAX_BATCH_MASK_BYTES
from .everything import MaskRecords, box_nms
from .instances import check_ais_params, object_records, require_ais_packages
from .mask_runs import MaskRuns, paint_runs
from .tiling import IntensityRange, Tile, TileGrid, TileSpec

EDGE_TOLERANCE = 20  # px: SAM's is_box_near_crop_edge atol (crops much larger than tiles)


def min_everything_halo(tile: int) -> int:
    """The least halo segment-everything works with: a tile keeps the objects crossing its border
    that end within the halo less the edge tolerance; 1/16 of the tile (at least 8 px) leaves room
    for the small objects tiles are for (the coarse layer has the large ones)."""
    return max(8, tile // 16)


class TiledImage:
    """One large image (H x W or H x W x C array-like: numpy, memmap, zarr) cut into tiles."""

    def __init__(self, session: Any, image: Any, spec: TileSpec, adapter: Optional[str] = None, cache: int = 4,
                 intensity: Optional[IntensityRange] = None):
        if len(image.shape) not in (2, 3) or min(image.shape[:2]) < 1:
            raise PeftExportError(f"image: expected HxW or HxWxC, got shape {tuple(image.shape)}")
        self.session, self.image, self.spec, self.adapter = session, image, spec, adapter
        self.shape = (int(image.shape[0]), int(image.shape[1]))
        self.grid = TileGrid(self.shape, spec)
        self.intensity = intensity or IntensityRange(image, session._intensity_rule)
        self._cache: "OrderedDict[Tuple[int, int], Any]" = OrderedDict()
        self._cache_size = cache

    def has_embedding(self, tile: Tile) -> bool:
        """Whether ``tile``'s embedding is cached (``embedding`` returns at once)."""
        return ((-1, -1) if self.grid.single else tile.index) in self._cache

    def pixels(self, tile: Tile) -> np.ndarray:
        y0, y1, x0, x1 = tile.outer
        return np.asarray(self.image[y0:y1, x0:x1])

    def embedding(self, tile: Tile) -> Any:
        """The tile's embedding (an ``ImageEmbedding``/``EncodedImage``, or a SAM 2 session's ``Sam2Embedding``:
        the image embedding and its two high-res feature maps), made by the session's ``encode_tile``."""
        if self.grid.single:
            key = (-1, -1)
            make: Callable[[], Any] = lambda: self.session.encode(np.asarray(self.image))
        else:
            key = tile.index
            make = lambda: self.session.encode_tile(self.pixels(tile), self.intensity, self.spec)
        if key not in self._cache:
            self._cache[key] = make()
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    # ---- prompts ---------------------------------------------------------------------------

    def route(self, point_coords: Optional[np.ndarray], point_labels: Optional[np.ndarray],
              box: Optional[np.ndarray]) -> Tile:
        """The tile a prompt goes to; refuses prompts that do not fit in one tile."""
        return self.route_on(self.grid, point_coords, point_labels, box)

    @staticmethod
    def route_on(grid: TileGrid, point_coords: Optional[np.ndarray], point_labels: Optional[np.ndarray],
                 box: Optional[np.ndarray]) -> Tile:
        """``route`` on a grid alone (inputs checked before any tile is encoded)."""
        spec = grid.spec
        if box is not None:
            b = np.asarray(box, np.float64).reshape(-1)
            bw, bh = b[2] - b[0], b[3] - b[1]
            if bw > spec.tile or bh > spec.tile:
                raise PeftExportError(f"box: {bw:g}x{bh:g} px is larger than one tile ({spec.tile} px); "
                                      "use a larger tile or predict on a crop around the object")
            x, y = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        elif point_coords is not None:
            pts = np.asarray(point_coords, np.float64).reshape(-1, 2)
            lbl = np.ones(len(pts)) if point_labels is None else np.asarray(point_labels).reshape(-1)
            x, y = pts[int(np.argmax(lbl == 1))] if (lbl == 1).any() else pts[0]
        else:
            raise PeftExportError("predict: give point_coords and/or box")
        tile = grid.tile_at(x, y)
        y0, y1, x0, x1 = tile.outer
        pts = [] if point_coords is None else np.asarray(point_coords, np.float64).reshape(-1, 2).tolist()
        if box is not None:
            pts += [[b[0], b[1]], [b[2], b[3]]]
        for px, py in pts:
            if not (x0 <= px <= x1 and y0 <= py <= y1):
                raise PeftExportError(f"prompt: {px:g},{py:g} lies outside the tile that holds the prompt's centre "
                                      f"(x {x0}..{x1}, y {y0}..{y1}; tile {spec.tile} px): prompts of one "
                                      "object must fit in one tile")
        return tile

    def predict_window(self, point_coords=None, point_labels=None, box=None, **kwargs
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[int, int, int, int]]:
        """``SamSession.predict`` on the prompt's tile: (masks of the tile's window, iou, low-res,
        window (y0, y1, x0, x1) in image pixels)."""
        tile = self.route(point_coords, point_labels, box)
        y0, _, x0, _ = tile.outer
        shift = np.array([x0, y0], np.float64)
        pc = None if point_coords is None else np.asarray(point_coords, np.float64).reshape(-1, 2) - shift
        bx = None if box is None else np.asarray(box, np.float64).reshape(-1) - np.tile(shift, 2)
        masks, iou, low = self.session.predict(point_coords=pc, point_labels=point_labels, box=bx,
                                               embedding=self.embedding(tile), adapter=self.adapter, **kwargs)
        return masks, iou, low, tile.outer

    def predict(self, point_coords=None, point_labels=None, box=None, **kwargs):
        """Like ``SamSession.predict``: masks (C, H, W) of the whole image (refused above
        ``MAX_BATCH_MASK_BYTES``; ``predict_window`` gives the tile's window only)."""
        masks, iou, low, (y0, y1, x0, x1) = self.predict_window(point_coords, point_labels, box, **kwargs)
        need = masks.shape[0] * self.shape[0] * self.shape[1] * masks.dtype.itemsize
        if need > MAX_BATCH_MASK_BYTES:
            raise PeftExportError(f"predict: {masks.shape[0]} masks of {self.shape[0]}x{self.shape[1]} would take "
                                  f"{need / 2**30:.1f} GiB; use predict_window (the tile's window only)")
        full = np.zeros((masks.shape[0], *self.shape), masks.dtype)
        full[:, y0:y1, x0:x1] = masks
        return full, iou, low

    # ---- automatic instance segmentation -----------------------------------------------------

    def tile_maps(self, tile: Tile) -> np.ndarray:
        """The instance decoder's maps (3, h, w) of the tile's inner area."""
        maps = self.session.instance_maps(embedding=self.embedding(tile), adapter=self.adapter)
        if self.grid.single:
            return maps
        ys, xs = tile.inner_in_outer()
        return maps[:, ys, xs]

    def instance_maps(self, out: Any = None, progress: Optional[Callable[[Tile], None]] = None) -> Any:
        """(3, H, W) float32 maps assembled from the tiles' inner areas into ``out`` (default numpy)."""
        self.session._ais_graph(self.adapter)  # before any tile is encoded
        out = np.zeros((3, *self.shape), np.float32) if out is None else out
        for tile in self.grid:
            y0, y1, x0, x1 = tile.inner
            out[:, y0:y1, x0:x1] = self.tile_maps(tile)
            if progress is not None:
                progress(tile)
        return out

    def segment_instances(self, block: int = 1024, halo: int = 64, **params: Any
                          ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
        """``SamSession.segment_instances`` on the whole image: (int32 labels H x W, records)."""
        p = check_ais_params(params)
        self.session._ais_graph(self.adapter)  # before any tile is encoded
        require_ais_packages()
        labels = instances_blockwise(self.instance_maps(), p, block=block, halo=halo)
        return labels, object_records(labels)

    # ---- segment-everything ------------------------------------------------------------------

    def coarse_embedding(self) -> Any:
        """The whole image as one picture at the model input (SAM's crop layer 0)."""
        return self.session.encode_whole(self.image, self.intensity, self.spec.image_size)

    def segment_everything(self, **options: Any) -> Tuple[np.ndarray, MaskRecords]:
        """``SamSession.segment_everything`` per tile and on the whole image, then SAM's crop-layer
        merge (module docstring): masks touching an inner tile edge dropped, box NMS
        (``box_nms_thresh``) across layers, tiles preferred."""
        if self.grid.single:
            return self.session.segment_everything(embedding=self.embedding(self.grid.tiles[0]), adapter=self.adapter,
                                                   **options)
        if self.spec.halo < min_everything_halo(self.spec.tile):
            raise PeftExportError(f"halo: {self.spec.halo} px is too small for segment-everything on "
                                  f"{self.spec.tile}-px tiles (at least {min_everything_halo(self.spec.tile)})")
        options = {**options, "return_masks": "runs"}
        per_tile = []
        for tile in self.grid:
            _, recs = self.session.segment_everything(embedding=self.embedding(tile), adapter=self.adapter, **options)
            per_tile.append((tile.outer, list(recs)))
        _, coarse = self.session.segment_everything(embedding=self.coarse_embedding(), adapter=self.adapter,
                                                    **options)
        return merge_tile_masks(per_tile, self.shape, float(options.get("box_nms_thresh", 0.7)),
                                min(EDGE_TOLERANCE, max(1, self.spec.halo // 4)), coarse=list(coarse))


def _mask_runs(r: Dict[str, Any], y0: int, x0: int) -> MaskRuns:
    """A record's mask (bool array of its window, or runs in the window) as runs in image pixels."""
    m = r.pop("segmentation")
    runs = m if isinstance(m, MaskRuns) else MaskRuns.from_mask(np.asarray(m, bool))
    return MaskRuns(runs.rows + y0, runs.starts + x0, runs.ends + x0)


def merge_tile_masks(per_tile: List[Tuple[Tuple[int, int, int, int], List[Dict[str, Any]]]],
                     shape: Tuple[int, int], nms: float, edge_tolerance: int = EDGE_TOLERANCE,
                     coarse: Optional[List[Dict[str, Any]]] = None) -> Tuple[np.ndarray, MaskRecords]:
    """SAM's crop-layer merge of per-tile records (each with "segmentation" in its tile's window
    ``outer``: a bool array or ``MaskRuns``) and of the whole image's (``coarse``, in image pixels):
    tile masks within ``edge_tolerance`` px of a tile edge that is not the image's edge are
    dropped (another tile sees them whole; tiles use min(20, halo / 4)), then box NMS across all:
    a tile's mask wins over the coarse layer's (SAM keeps the smaller crop's), else the higher
    predicted IoU; labels painted largest first."""
    h, w = shape
    found, summary = [], {"tiles": len(per_tile), "edge": 0}
    for (y0, y1, x0, x1), recs in per_tile:
        for r in recs:
            bx, by, bw, bh = r["bbox"]
            box = np.array([bx + x0, by + y0, bx + bw + x0, by + bh + y0], np.float64)
            t = edge_tolerance
            near = [(x0 > 0 and box[0] <= x0 + t), (y0 > 0 and box[1] <= y0 + t),
                    (x1 < w and box[2] >= x1 - t), (y1 < h and box[3] >= y1 - t)]
            if any(near):
                summary["edge"] += 1
                continue
            found.append((box, dict(r), (y0, x0), 1.0))
    for r in coarse or []:
        bx, by, bw, bh = r["bbox"]
        found.append((np.array([bx, by, bx + bw, by + bh], np.float64), dict(r), (0, 0), 0.0))
    scores = np.array([f[3] + f[1]["predicted_iou"] for f in found], np.float32)
    keep = box_nms(np.stack([f[0] for f in found]), scores, nms) if found else np.zeros(0, int)
    summary["nms"] = len(found) - len(keep)
    kept = sorted((found[i] for i in keep), key=lambda f: -f[1]["area"])  # largest painted first
    if coarse is not None:
        summary["coarse"] = sum(1 for f in kept if f[3] == 0.0)
    labels = np.zeros(h * w, np.int32)
    records = MaskRecords()
    for k, (box, r, (y0, x0), _) in enumerate(kept, start=1):
        m = _mask_runs(r, y0, x0)
        paint_runs(labels, m.rows * w + m.starts, m.ends - m.starts, k)
        r["bbox"] = [int(box[0]), int(box[1]), int(box[2] - box[0]), int(box[3] - box[1])]
        r["point_coords"] = [[p[0] + x0, p[1] + y0] for p in r["point_coords"]]
        records.append(r)
    summary["objects"] = len(records)
    records.summary = summary
    return labels.reshape(shape), records
