"""Torch-free inference: numpy + onnxruntime only (TensorRT optional, imported lazily)."""

from .everything import build_point_grid, label_components, remove_small_regions, segment_everything
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
from .session import ImageEmbedding, SamSession, read_manifest

__all__ = [
    "DEFAULT_INTENSITY_RULE",
    "ImageEmbedding",
    "SamSession",
    "build_point_grid",
    "label_components",
    "normalize_intensity",
    "postprocess_masks",
    "prepare_image",
    "preprocess_shape",
    "read_manifest",
    "remove_small_regions",
    "resize_bilinear",
    "resize_longest_side",
    "resize_pil",
    "segment_everything",
    "transform_boxes",
    "transform_coords",
]
