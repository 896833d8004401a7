"""Automatic instance segmentation (AIS) from the instance decoder's three maps, as micro-sam does it.

The decoder predicts, per pixel, a foreground probability and two per-object normalised
distances (to the object's centre and to its boundary; both near 0 in the middle of an
object). ``instances_from_maps`` follows micro-sam's ``InstanceSegmentationWithDecoder.generate``
and torch-em's ``watershed_from_center_and_boundary_distances``:

1. smooth the foreground map (Gaussian, ``foreground_smoothing``) and both distance maps
   (``distance_smoothing``); the Gaussian is vigra's (radius ceil(3 sigma), mirrored borders);
2. foreground = smoothed foreground > ``foreground_threshold``;
3. seeds = 8-connected components of (centre distance < ``center_distance_threshold``) and
   (boundary distance < ``boundary_distance_threshold``) inside the foreground;
4. seeded watershed (4-connected) of the boundary distances, restricted to the foreground;
5. objects under ``min_size`` pixels are removed, the rest renumbered 1..n.

Needs scipy and scikit-image (``pip install 'peftexport[ais]'``), imported only when called,
so the runtime itself stays numpy + onnxruntime.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import numpy as np

from ..errors import PeftExportError
from .postprocess import postprocess_masks

# micro-sam's defaults (InstanceSegmentationWithDecoder.generate).
AIS_DEFAULTS: Dict[str, float] = {
    "center_distance_threshold": 0.5,
    "boundary_distance_threshold": 0.5,
    "foreground_threshold": 0.5,
    "foreground_smoothing": 1.0,
    "distance_smoothing": 1.6,
    "min_size": 0,
}
MAP_NAMES = ("foreground", "center_distances", "boundary_distances")
AIS_EXTRA_HINT = "pip install 'peftexport[ais]' (scikit-image and scipy)"


def require_ais_packages() -> Tuple[Any, Any]:
    """(scipy.ndimage, skimage.segmentation.watershed), or a one-line error naming the extra."""
    try:
        from scipy import ndimage
        from skimage.segmentation import watershed
    except ImportError as exc:
        name = (exc.name or str(exc)).split(".")[0]
        raise PeftExportError(f"instance segmentation: {name} is not installed; {AIS_EXTRA_HINT}") from None
    return ndimage, watershed


def check_ais_params(params: Dict[str, Any]) -> Dict[str, float]:
    """micro-sam's defaults updated by ``params``; unknown names and bad values are refused."""
    out = dict(AIS_DEFAULTS)
    for key, value in params.items():
        if key not in out:
            raise PeftExportError(f"segment_instances: unknown parameter {key!r} (known: {', '.join(AIS_DEFAULTS)})")
        if value is None:
            continue
        if not isinstance(value, (int, float, np.number)) or not math.isfinite(float(value)):
            raise PeftExportError(f"{key}: expected a number, got {value!r}")
        if key.endswith("smoothing") and value < 0:
            raise PeftExportError(f"{key}: must be >= 0 (0 turns smoothing off), got {value}")
        if key == "min_size" and (value < 0 or int(value) != value):
            raise PeftExportError(f"min_size: must be a whole number >= 0, got {value}")
        out[key] = int(value) if key == "min_size" else float(value)
    return out


def gaussian_smoothing(image: np.ndarray, sigma: float, ndimage: Any = None) -> np.ndarray:
    """vigra's / bioimage-cpp's gaussianSmoothing: kernel radius ceil(3 sigma), mirrored borders, float32."""
    ndimage = ndimage or require_ais_packages()[0]
    x = np.asarray(image, dtype=np.float32)
    return ndimage.gaussian_filter(x, sigma, mode="mirror", radius=max(int(math.ceil(3.0 * sigma)), 1))


def instances_from_maps(
    foreground: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    center_distance_threshold: float = 0.5,
    boundary_distance_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    foreground_smoothing: float = 1.0,
    distance_smoothing: float = 1.6,
    min_size: int = 0,
) -> np.ndarray:
    """Instance labels (int32, 0 = background, objects 1..n) from the three AIS maps (H x W each)."""
    ndimage, watershed = require_ais_packages()
    maps = [np.asarray(m, dtype=np.float32) for m in (foreground, center_distances, boundary_distances)]
    if maps[0].ndim != 2 or any(m.shape != maps[0].shape for m in maps):
        raise PeftExportError(f"instance maps: expected three HxW maps of one shape, got {[m.shape for m in maps]}")
    fg, cdist, bdist = maps
    if foreground_smoothing > 0:
        fg = gaussian_smoothing(fg, foreground_smoothing, ndimage)
    if distance_smoothing > 0:
        cdist = gaussian_smoothing(cdist, distance_smoothing, ndimage)
        bdist = gaussian_smoothing(bdist, distance_smoothing, ndimage)
    fg_mask = fg > foreground_threshold
    seeds = (cdist < center_distance_threshold) & (bdist < boundary_distance_threshold) & fg_mask
    markers, _ = ndimage.label(seeds, structure=np.ones((3, 3), dtype=bool))  # 8-connected, raster order
    labels = watershed(bdist, markers=markers, mask=fg_mask)
    return filter_small_objects(np.asarray(labels), int(min_size))


def filter_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects under ``min_size`` pixels and renumber the rest 1..n in order of their ids (int32)."""
    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    new_ids = np.zeros(len(sizes), dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labels]


def object_records(labels: np.ndarray) -> List[Dict[str, Any]]:
    """Per object of ``labels`` (ids 1..n): id, area, bbox (XYWH with inclusive max, as
    segment-everything's records), centroid (x, y)."""
    ndimage, _ = require_ais_packages()
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)
    yy, xx = np.indices(labels.shape)
    cy = np.bincount(flat, weights=yy.ravel(), minlength=n + 1)
    cx = np.bincount(flat, weights=xx.ravel(), minlength=n + 1)
    records = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        ys, xs = box
        records.append({"id": i, "area": int(area[i]), "bbox": [xs.start, ys.start, xs.stop - 1 - xs.start,
                                                                ys.stop - 1 - ys.start],
                        "centroid": [float(cx[i] / area[i]), float(cy[i] / area[i])]})
    return records


def maps_to_image(maps: np.ndarray, input_size: Tuple[int, int], original_size: Tuple[int, int],
                  image_size: int) -> np.ndarray:
    """Decoder maps (3, S, S) at the model's input resolution -> (3, H, W) of the original image
    (crop the resized image's area, resize bilinearly: ``Sam.postprocess_masks`` / torch-em)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 4:
        maps = maps[0]
    if maps.shape[0] != 3 or maps.shape[-2:] != (image_size, image_size):
        raise PeftExportError(f"instance decoder: output shape {maps.shape}, expected (3, {image_size}, {image_size})")
    return postprocess_masks(maps, input_size, original_size, image_size)


def segment_from_maps(maps: np.ndarray, params: Dict[str, Any]) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """(labels int32 HxW, records) from (3, H, W) maps with ``check_ais_params(params)``."""
    p = check_ais_params(params)
    labels = instances_from_maps(maps[0], maps[1], maps[2], **p)
    return labels, object_records(labels)

