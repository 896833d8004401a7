"""napari sample data: the demo's synthetic fluorescence nuclei (``peftexport demo`` makes the same
kind of images), so a newcomer can try an export without images of their own; and a synthetic
whole slide, to try the large-image path (tiles encoded on demand, lazily backed results)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..data import synthetic_sample
from .pyramid import level_shapes

SAMPLE_SIZE = 256
SLIDE_SIZE = 20000
SLIDE_PATCH = (9600, 9700)  # row, col of the slide's 1024 px patch of nuclei
PATCH_SIZE = 1024


def synthetic_nuclei() -> List[Tuple[Any, dict, str]]:
    """One 256 x 256 uint16 nuclei image (seed 0) as a napari Image layer."""
    image, _ = synthetic_sample(SAMPLE_SIZE, seed=0)
    return [(image, {"name": "synthetic nuclei", "colormap": "gray"}, "image")]


def synthetic_slide_levels(size: int = SLIDE_SIZE, folder: Optional[Path] = None) -> List[Any]:
    """A ``size`` x ``size`` uint16 zarr pyramid (chunks of 1024 px, each level half the one before,
    down to 2048 px) that is dark but for one 1024 px patch of nuclei (seed 30) at ``SLIDE_PATCH``
    (scaled to fit a smaller ``size``). Only the patch's chunks are stored: in memory, or in ``folder``."""
    import zarr
    from zarr.storage import MemoryStore

    patch, _ = synthetic_sample(PATCH_SIZE, seed=30)
    y0, x0 = (min(p, size - PATCH_SIZE) for p in SLIDE_PATCH)
    root = zarr.open_group(str(folder) if folder is not None else MemoryStore(), mode="w")
    levels = []
    for k, shape in enumerate(level_shapes((size, size))):
        f = 2**k
        level = root.create_array(str(k), shape=shape, chunks=(1024, 1024), dtype="uint16", fill_value=0)
        block = patch[::f, ::f]
        level[y0 // f : y0 // f + block.shape[0], x0 // f : x0 // f + block.shape[1]] = block
        levels.append(level)
    return levels


def synthetic_slide() -> List[Tuple[Any, dict, str]]:
    """A 20000 x 20000 px synthetic slide as a multiscale Image layer (zarr in memory, a few MB)."""
    return [(synthetic_slide_levels(), {"name": "synthetic slide", "colormap": "gray", "multiscale": True},
             "image")]
