"""Calibration images for static int8: the user's own images, preprocessed exactly as the runtime does."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..data.io import is_image_file, read_image_planes
from ..errors import PeftExportError
from ..models import PIXEL_MEAN, PIXEL_STD
from ..runtime.preprocess import SAM_INTERPOLATION, prepare_image

MAX_CALIBRATION_IMAGES = 16  # activation ranges settle after a few images; each costs an fp32 encoder run


def calibration_inputs(directory: str | Path, image_size: int, intensity: dict,
                       max_images: int = MAX_CALIBRATION_IMAGES, prepare=None) -> tuple[list[np.ndarray], dict]:
    """Encoder inputs (1,3,S,S) of up to ``max_images`` 2D planes of the images in ``directory``
    (sorted by name), and a record of what was used for the manifest. ``prepare(plane, intensity, S)``
    makes one input (default SAM's ``prepare_image``; SAM 2 passes its own)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PeftExportError(f"--calibration-data: {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise PeftExportError(f"--calibration-data: {directory} has no image files (TIFF, PNG, JPEG, NPY)")
    inputs, used, sources, digest = [], [], [], hashlib.sha256()
    for path in files:
        planes = read_image_planes(path)
        for i, plane in enumerate(planes):
            if prepare is not None:
                x = prepare(plane, intensity, image_size)
            else:
                x, _, _ = prepare_image(plane, intensity, image_size, PIXEL_MEAN, PIXEL_STD, SAM_INTERPOLATION)
            inputs.append(x)
            sources.append(path.name if len(planes) == 1 else f"{path.name}#{i}")
            digest.update(np.ascontiguousarray(plane).tobytes())
            if path.name not in used:
                used.append(path.name)
            if len(inputs) >= max_images:
                break
        if len(inputs) >= max_images:
            break
    record = {"directory": str(directory.resolve()), "files": used, "planes": len(inputs),
              "plane_sources": sources, "sha256_of_pixels": digest.hexdigest()}
    return inputs, record
