"""Synthetic fluorescence-nuclei images with instance labels, for demos and tests.

Nuclei are filled ellipses (radii ``radius`` px) with a dimmer rim and smooth texture,
some touching, on a smooth background; the image is blurred (microscope PSF), gets
Poisson shot noise and Gaussian read noise, and is stored as uint16.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import PeftExportError
from ..fsutil import atomic_file
from .dataset import Pair


def _default_n_objects(size: int) -> tuple[int, int]:
    scale = (size / 256.0) ** 2
    return max(1, round(8 * scale)), max(1, round(16 * scale))


def _draw(rng: np.random.Generator, size: int, n_objects: int | tuple[int, int] | None,
          radius: tuple[float, float], touch_prob: float) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = n_objects if isinstance(n_objects, tuple) else (
        (n_objects, n_objects) if n_objects is not None else _default_n_objects(size))
    n = int(rng.integers(lo, hi + 1))
    r_min, r_max = radius
    if not 0 < r_min <= r_max or 2 * r_max + 4 > size:
        raise PeftExportError(f"radius: need 0 < min <= max and objects that fit a {size}px image, got {radius}")
    label = np.zeros((size, size), dtype=np.int32)
    profile = np.zeros((size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centres: list[tuple[float, float, float]] = []
    attempts = 0
    while len(centres) < n:
        attempts += 1
        if attempts > 300 * n:
            raise PeftExportError(f"synthetic data: cannot place {n} objects of radius {radius} "
                                  f"in a {size}px image; ask for fewer or smaller objects")
        ry, rx = rng.uniform(r_min, r_max, 2)
        r = max(ry, rx)
        neighbour = -1
        if centres and rng.random() < touch_prob:
            # put it against an existing nucleus so that some objects touch
            neighbour = int(rng.integers(len(centres)))
            ny, nx, nr = centres[neighbour]
            angle = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.75, 0.9) * (r + nr)
            cy, cx = ny + dist * np.sin(angle), nx + dist * np.cos(angle)
            if not (r + 2 <= cy <= size - r - 2 and r + 2 <= cx <= size - r - 2):
                continue
        else:
            cy, cx = rng.uniform(r + 2, size - r - 2, 2)
        if any(np.hypot(cy - y, cx - x) < 1.05 * (r + R)
               for j, (y, x, R) in enumerate(centres) if j != neighbour):
            continue
        theta = rng.uniform(0, np.pi)
        y0, y1 = int(max(cy - r - 1, 0)), int(min(cy + r + 2, size))
        x0, x1 = int(max(cx - r - 1, 0)), int(min(cx + r + 2, size))
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
        rho2 = u * u + v * v
        inside = (rho2 <= 1.0) & (label[y0:y1, x0:x1] == 0)
        if inside.sum() < 0.8 * np.pi * rx * ry:
            continue  # overlaps a neighbour too much
        comps, k = ndimage.label(inside)
        if k > 1:
            continue
        obj = len(centres) + 1
        label[y0:y1, x0:x1][inside] = obj
        brightness = rng.uniform(600.0, 2000.0)
        profile[y0:y1, x0:x1][inside] = brightness * (1.0 - 0.35 * rho2[inside])
        centres.append((cy, cx, r))
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (size, size)).astype(np.float32), 2.0)
    texture *= 0.1 / max(float(texture.std()), 1e-6)
    gy, gx = rng.uniform(-40, 40, 2)
    background = 120.0 + gy * (yy / size - 0.5) + gx * (xx / size - 0.5)
    clean = background + profile * (1.0 + texture)
    return acquire(rng, clean, 1.2), label


def acquire(rng: np.random.Generator, clean: np.ndarray, psf_sigma: float | tuple[float, ...]) -> np.ndarray:
    """The microscope: the clean signal blurred (Gaussian PSF, sigma per axis), Poisson shot noise
    and Gaussian read noise (offset 100, sd 8), as uint16."""
    clean = ndimage.gaussian_filter(clean, psf_sigma)
    noisy = rng.poisson(np.clip(clean, 0, None)).astype(np.float64) + rng.normal(100.0, 8.0, clean.shape)
    return np.clip(np.round(noisy), 0, 65535).astype(np.uint16)


def synthetic_sample(size: int = 256, seed: int | list[int] = 0, n_objects: int | tuple[int, int] | None = None,
                     radius: tuple[float, float] = (8.0, 20.0), touch_prob: float = 0.3
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (uint16 HxW) and its instance labels (int32 HxW, ids 1..n).

    ``n_objects`` is an exact count or an inclusive (min, max) range; by default
    8-16 objects per 256x256 image, scaled with the area.
    """
    return _draw(np.random.default_rng(seed), int(size), n_objects, radius, touch_prob)


def make_demo_data(out_dir: str | os.PathLike, n_images: int = 8, size: int = 256, seed: int = 0,
                   n_objects: int | tuple[int, int] | None = None, radius: tuple[float, float] = (8.0, 20.0),
                   overwrite: bool = False) -> list[Pair]:
    """Write ``out_dir/images/demo_XXX.tif`` and ``out_dir/labels/demo_XXX.tif`` (uint16 / int32).

    Returns the written pairs in order. Image ``i`` is ``synthetic_sample(size, [seed, i])``.
    """
    if n_images < 1:
        raise PeftExportError(f"n_images: must be >= 1, got {n_images}")
    import tifffile

    out_dir = Path(out_dir)
    img_dir, lab_dir = out_dir / "images", out_dir / "labels"
    for d in (img_dir, lab_dir):
        d.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n_images):
        image, label = synthetic_sample(size, [seed, i], n_objects, radius)
        name = f"demo_{i:03d}"
        img_path, lab_path = img_dir / f"{name}.tif", lab_dir / f"{name}.tif"
        with atomic_file(img_path, overwrite) as tmp:
            tifffile.imwrite(tmp, image)
        with atomic_file(lab_path, overwrite) as tmp:
            tifffile.imwrite(tmp, label)
        pairs.append(Pair(name, img_path, lab_path))
    return pairs


def synthetic_mosaic(h: int, w: int, seed: int = 0, row_seed_stride: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """An h x w image of the demo's nuclei at native scale (256-px synthetic samples side by side,
    sample (i, j) drawn with seed ``seed + row_seed_stride * i + j``) and its instance labels, unique
    over the mosaic: a large image whose ground truth is known, for tiled segmentation."""
    image = np.zeros((h, w), np.uint16)
    labels = np.zeros((h, w), np.int32)
    k = 0
    for i, y in enumerate(range(0, h, 256)):
        for j, x in enumerate(range(0, w, 256)):
            img, lab = synthetic_sample(256, seed=seed + row_seed_stride * i + j)
            hh, ww = min(256, h - y), min(256, w - x)
            image[y:y + hh, x:x + ww] = img[:hh, :ww]
            lab = lab[:hh, :ww].astype(np.int32)
            labels[y:y + hh, x:x + ww] = np.where(lab > 0, lab + k, 0)
            k += int(lab.max())
    return image, labels
