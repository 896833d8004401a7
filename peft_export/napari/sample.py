"""napari sample data: the demo's synthetic fluorescence nuclei (``peftexport demo`` makes the same
kind of images), so a newcomer can try an export without images of their own."""

from __future__ import annotations

from typing import Any, List, Tuple

from ..data import synthetic_sample

SAMPLE_SIZE = 256


def synthetic_nuclei() -> List[Tuple[Any, dict, str]]:
    """One 256 x 256 uint16 nuclei image (seed 0) as a napari Image layer."""
    image, _ = synthetic_sample(SAMPLE_SIZE, seed=0)
    return [(image, {"name": "synthetic nuclei", "colormap": "gray"}, "image")]
