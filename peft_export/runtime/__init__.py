"""Stage 7, runtime: torch-free inference on an export dir (SamSession, pre/post-processing, segment-everything,
automatic instance segmentation from micro-sam's instance decoder).

May import: errors, fsutil (numpy + onnxruntime only; other backends' packages lazily; tests enforce it).
"""

from .everything import MaskRecords, build_point_grid, filter_report, segment_everything
from .regions import label_components, remove_small_regions
from .instances import AIS_DEFAULTS, instances_from_maps, object_records
from .intensity import DEFAULT_INTENSITY_RULE, normalize_intensity
from .postprocess import postprocess_masks, resize_bilinear
from .preprocess import (
    prepare_image,
    preprocess_shape,
    resize_longest_side,
    resize_pil,
    transform_boxes,
    transform_coords,
)
from .manifest import read_manifest
from .adapters import EncodedImage
from .session import ImageEmbedding, SamSession
from .backends.ort import session_options

__all__ = [
    "AIS_DEFAULTS",
    "DEFAULT_INTENSITY_RULE",
    "EncodedImage",
    "ImageEmbedding",
    "MaskRecords",
    "SamSession",
    "build_point_grid",
    "filter_report",
    "instances_from_maps",
    "label_components",
    "normalize_intensity",
    "object_records",
    "postprocess_masks",
    "prepare_image",
    "preprocess_shape",
    "read_manifest",
    "remove_small_regions",
    "resize_bilinear",
    "resize_longest_side",
    "resize_pil",
    "segment_everything",
    "session_options",
    "transform_boxes",
    "transform_coords",
]
