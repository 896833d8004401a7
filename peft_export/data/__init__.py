"""Stage 3, data: reading images and labels, validation, patches, prompt sampling, synthetic nuclei.

May import: runtime.intensity, errors, fsutil (numpy, scipy, tifffile, Pillow; never torch).
"""

from .dataset import Pair, Sample, find_pairs, find_pairs_glob, load_samples, split_by_file, validate_pairs
from .io import (
    IMAGE_EXTENSIONS,
    file_stem,
    image_planes,
    label_planes,
    plane_names,
    read_array,
    read_image_planes,
    read_label_planes,
)
from .labels import (
    mask_of,
    object_sizes,
    objects_in_label,
    relabel_consecutive,
    remove_small_objects,
    semantic_to_instance,
)
from .patches import PatchSampler, augment_pair, sample_patch
from .prompts import (
    PADDING_POINT,
    box_from_mask,
    corrective_point,
    corrective_points,
    sample_positive_point,
)
from .synthetic import make_demo_data, synthetic_mosaic, synthetic_sample
from .synthetic_volume import make_movie_data, make_volume_data, synthetic_movie, synthetic_volume

__all__ = [
    "IMAGE_EXTENSIONS", "PADDING_POINT", "Pair", "PatchSampler", "Sample", "augment_pair", "box_from_mask",
    "corrective_point", "corrective_points", "file_stem", "find_pairs", "find_pairs_glob", "image_planes",
    "label_planes", "load_samples", "make_demo_data", "make_movie_data", "make_volume_data", "mask_of", "object_sizes", "objects_in_label",
    "plane_names", "read_array", "read_image_planes", "read_label_planes", "relabel_consecutive",
    "remove_small_objects", "sample_patch", "sample_positive_point", "semantic_to_instance", "split_by_file",
    "synthetic_mosaic", "synthetic_movie", "synthetic_sample", "synthetic_volume", "validate_pairs",
]
