""""Segment all": automatic instance segmentation (AIS) when the export has micro-sam's instance
decoder, otherwise SAM's segment-everything; the parameters and defaults are the CLI's
(``peftexport predict --instances`` / ``--everything``), and their help is the widgets' tooltips.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from ..errors import PeftExportError
from ..predict import EVERYTHING_DEFAULTS
from ..runtime import AIS_DEFAULTS

# "Segment all" keeps the whole plane's results in memory (the instance decoder's three float32 maps
# and the int32 labels: 16 bytes per pixel, 1 GiB at this size); larger planes go to the CLI, which
# writes zarr block by block.
SEGMENT_ALL_MAX_PIXELS = 8192 * 8192


class Param(NamedTuple):
    name: str  # the SamSession keyword
    label: str
    default: float
    minimum: float
    maximum: float
    step: float
    tooltip: str

    @property
    def whole(self) -> bool:
        return float(self.step).is_integer()


AIS_PARAMS: Tuple[Param, ...] = (
    Param("center_distance_threshold", "centre distance", AIS_DEFAULTS["center_distance_threshold"], 0, 1, 0.05,
          "Seeds are pixels whose smoothed distance to their object's centre is below this (0-1). "
          "CLI --center-distance-threshold."),
    Param("boundary_distance_threshold", "boundary distance", AIS_DEFAULTS["boundary_distance_threshold"], 0, 1, 0.05,
          "Seeds also need a boundary distance below this (0-1). CLI --boundary-distance-threshold."),
    Param("foreground_threshold", "foreground", AIS_DEFAULTS["foreground_threshold"], 0, 1, 0.05,
          "Pixels whose smoothed foreground probability exceeds this belong to objects. CLI --foreground-threshold."),
    Param("foreground_smoothing", "foreground smoothing", AIS_DEFAULTS["foreground_smoothing"], 0, 10, 0.1,
          "Gaussian sigma (pixels) applied to the foreground map; 0: off. CLI --foreground-smoothing."),
    Param("distance_smoothing", "distance smoothing", AIS_DEFAULTS["distance_smoothing"], 0, 10, 0.1,
          "Gaussian sigma (pixels) applied to both distance maps; 0: off. CLI --distance-smoothing."),
    Param("min_size", "min size", AIS_DEFAULTS["min_size"], 0, 100000, 1,
          "Objects with fewer pixels are removed. CLI --min-size."),
)

EVERYTHING_PARAMS: Tuple[Param, ...] = (
    Param("points_per_side", "points per side", EVERYTHING_DEFAULTS["points_per_side"], 1, 128, 1,
          "Grid of N x N point prompts over the image; the decoder runs once per point. CLI --points-per-side."),
    Param("pred_iou_thresh", "predicted IoU", EVERYTHING_DEFAULTS["pred_iou_thresh"], 0, 1, 0.01,
          "Masks whose predicted IoU is below this are dropped. CLI --pred-iou-thresh."),
    Param("stability_score_thresh", "stability", EVERYTHING_DEFAULTS["stability_score_thresh"], 0, 1, 0.01,
          "Masks whose stability score (IoU of the mask at logit thresholds +-1) is below this are dropped. "
          "CLI --stability-thresh."),
    Param("box_nms_thresh", "box NMS", EVERYTHING_DEFAULTS["box_nms_thresh"], 0, 1, 0.05,
          "Box IoU above which non-maximum suppression drops the lower-scored mask. CLI --box-nms-thresh."),
    Param("min_mask_region_area", "min area", EVERYTHING_DEFAULTS["min_mask_region_area"], 0, 100000, 1,
          "Holes and islands smaller than this (pixels) are removed from each mask. CLI --min-area."),
    Param("points_per_batch", "points per batch", EVERYTHING_DEFAULTS["points_per_batch"], 1, 1024, 1,
          "Point prompts decoded together (memory vs. speed; the result does not change)."),
)


def has_instance_decoder(session: Any, adapter: Optional[str]) -> bool:
    """Whether "Segment all" runs AIS for this export (and adapter of a shared-trunk export)."""
    if session.adapters:
        return adapter in session.ais_adapters
    return bool(session.has_instance_decoder)


def needs_tiles(session: Any, shape: Tuple[int, ...]) -> bool:
    """An image larger than the model input is segmented tile by tile at full resolution (SAM and SAM 2
    exports alike: ``runtime.tiled``)."""
    return max(shape[:2]) > int(session.image_size)


def check_segment_all_size(shape: Tuple[int, ...]) -> None:
    """Refuse "Segment all" on a plane too large to hold its results in memory, with the CLI to use."""
    h, w = int(shape[0]), int(shape[1])
    if h * w > SEGMENT_ALL_MAX_PIXELS:
        raise PeftExportError(
            f"Segment all: a {w}x{h} plane needs about {16 * h * w / 2**30:.1f} GiB here; segment it with "
            "'peftexport predict EXPORT IMAGE.zarr --instances -o labels.zarr' (tile by tile, zarr out; "
            "--everything without an instance decoder) and open labels.zarr in napari")


def check_stack_size(shape: Tuple[int, ...], what: str, option: str) -> None:
    """Refuse "Segment all (3D)" / "Track" on a stack whose labels (per-plane, merged, the layer's)
    would not fit in memory here, with the CLI that runs it slab by slab into zarr."""
    n, h, w = (int(s) for s in shape[:3])
    if n * h * w > SEGMENT_ALL_MAX_PIXELS:
        raise PeftExportError(
            f"{what}: a {n}x{h}x{w} stack needs about {16 * n * h * w / 2**30:.1f} GiB here; run 'peftexport "
            f"predict EXPORT stack.zarr {option} -o labels.zarr' and open labels.zarr in napari")


def mode_params(session: Any, adapter: Optional[str], params: Optional[Dict[str, float]] = None
                ) -> Tuple[bool, Dict[str, Any]]:
    """(AIS or not, the full parameters of that mode): ``params`` over the defaults, names of the
    other mode ignored, whole numbers as int."""
    params = params or {}
    ais = has_instance_decoder(session, adapter)
    spec = AIS_PARAMS if ais else EVERYTHING_PARAMS
    return ais, {p.name: (int(params.get(p.name, p.default)) if p.whole else float(params.get(p.name, p.default)))
                 for p in spec}


def segment_all(session: Any, embedding: Any, adapter: Optional[str] = None,
                params: Optional[Dict[str, float]] = None, image: Any = None) -> Dict[str, Any]:
    """Labels (int32 H x W) of every object: {"labels", "mode" ("instances"/"everything"), "n_objects",
    "params", "tiles"}.

    ``params`` override the defaults of the mode that runs; names of the other mode are ignored.
    With ``image`` (instead of ``embedding``; any array-like, read tile by tile) the runtime's tiles
    are used (``SamSession.tiled``, default tile and halo of the export): each tile at full
    resolution, objects across tile borders joined by the runtime.
    """
    ais, used = mode_params(session, adapter, params)
    runner, tiles = session, 0
    kwargs: Dict[str, Any] = {"embedding": embedding, "adapter": adapter}
    if image is not None:
        runner, kwargs = session.tiled(image, adapter=adapter), {}
        tiles = len(runner.grid)
    labels, records = (runner.segment_instances if ais else runner.segment_everything)(**kwargs, **used)
    n = len(records) if ais else int(labels.max()) if labels.size else 0
    return {"labels": np.asarray(labels, np.int32), "mode": "instances" if ais else "everything",
            "n_objects": n, "params": used, "tiles": tiles}
