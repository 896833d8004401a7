"""Synthetic 3D nuclei volumes and 2D+t nuclei movies with ground truth, for the volume demo and tests.

Volumes: ellipsoid nuclei (in-plane radii ``radius`` px, z radius the same physical size divided by
``anisotropy``, i.e. coarser z sampling as in confocal stacks), some touching, rendered with the 2D
demo's intensity profile and texture, blurred less along z, with the demo's noise (``acquire``).

Movies: the 2D demo's nuclei moving (a random velocity each, bouncing at the borders, never
overlapping), some dividing into two smaller daughters that move apart. The labels carry track ids
(one id per track, constant over its frames) and ``tracks`` the Cell Tracking Challenge lineage
(id, first frame, last frame, parent id or 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import PeftExportError
from ..fsutil import atomic_file
from .ctc import write_ctc_tracks
from .synthetic import acquire

CTC_TRACKS_SUFFIX = "_track.txt"  # labels/NAME.tif + labels/NAME_track.txt: a movie's lineage


def _ellipsoid(rng: np.random.Generator, label: np.ndarray, profile: np.ndarray, centre, radii, theta: float,
               obj: int, min_inside: float = 0.8) -> bool:
    """Paint one ellipsoid (rotated by ``theta`` in the yx plane) where ``label`` is still 0; False
    (nothing painted) when neighbours would take more than ``1 - min_inside`` of it or split it."""
    cz, cy, cx = centre
    rz, ry, rx = radii
    lo = [int(max(c - r - 1, 0)) for c, r in zip(centre, (rz, max(ry, rx), max(ry, rx)))]
    hi = [int(min(c + r + 2, n)) for c, r, n in zip(centre, (rz, max(ry, rx), max(ry, rx)), label.shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return False
    zz, yy, xx = np.mgrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    dz, dy, dx = zz - cz, yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    rho2 = u * u + v * v + (dz / rz) ** 2
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    body = rho2 <= 1.0
    inside = body & (label[window] == 0)
    if body.sum() == 0 or inside.sum() < min_inside * body.sum() or ndimage.label(inside)[1] != 1:
        return False
    label[window][inside] = obj
    profile[window][inside] = rng.uniform(600.0, 2000.0) * (1.0 - 0.35 * rho2[inside])
    return True


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma) -> np.ndarray:
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape).astype(np.float32), sigma)
    return texture * (0.1 / max(float(texture.std()), 1e-6))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gy, gx = rng.uniform(-40, 40, 2)
    return 120.0 + gy * (yy / h - 0.5) + gx * (xx / w - 0.5)


def synthetic_volume(shape: tuple[int, int, int] = (32, 256, 256), seed: int | list[int] = 0,
                     n_objects: int | tuple[int, int] | None = None, radius: tuple[float, float] = (8.0, 20.0),
                     anisotropy: float = 2.0, touch_prob: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic z-stack (uint16 Z x H x W) and its 3D instance labels (int32, ids 1..n).

    ``anisotropy``: z spacing / xy spacing (an object of radius r px in-plane spans about
    2 r / anisotropy planes). ``n_objects``: exact count or inclusive (min, max); default scales the
    2D demo's 8-16 nuclei per 256² plane with the volume's depth."""
    z, h, w = (int(s) for s in shape)
    r_min, r_max = radius
    if anisotropy <= 0 or not 0 < r_min <= r_max or 2 * r_max + 4 > min(h, w) or z < 1:
        raise PeftExportError(f"synthetic volume: need anisotropy > 0, 0 < radius min <= max and objects that fit "
                              f"{h}x{w} planes; got radius {radius}, anisotropy {anisotropy}, shape {shape}")
    rng = np.random.default_rng(seed)
    if n_objects is None:
        depth = max(z * anisotropy / (2.0 * r_max), 0.5)
        n_objects = (max(1, round(8 * h * w / 256**2 * depth)), max(1, round(16 * h * w / 256**2 * depth)))
    lo, hi = n_objects if isinstance(n_objects, tuple) else (n_objects, n_objects)
    n = int(rng.integers(lo, hi + 1))
    label = np.zeros((z, h, w), np.int32)
    profile = np.zeros((z, h, w), np.float32)
    centres: list[tuple[float, float, float, float]] = []  # physical (z * anisotropy, y, x, r)
    attempts = 0
    while len(centres) < n:
        attempts += 1
        if attempts > 300 * n:
            raise PeftExportError(f"synthetic volume: cannot place {n} nuclei of radius {radius} in {shape}; "
                                  "ask for fewer or smaller objects")
        rz_phys, ry, rx = rng.uniform(r_min, r_max, 3)
        r = max(rz_phys, ry, rx)
        neighbour = -1
        if centres and rng.random() < touch_prob:
            neighbour = int(rng.integers(len(centres)))
            nz, ny, nx, nr = centres[neighbour]
            direction = rng.normal(size=3)
            direction /= max(np.linalg.norm(direction), 1e-6)
            pz, py, px = np.array([nz, ny, nx]) + rng.uniform(0.75, 0.9) * (r + nr) * direction
        else:
            pz, py, px = rng.uniform(0, z * anisotropy), rng.uniform(r + 2, h - r - 2), rng.uniform(r + 2, w - r - 2)
        if not (0 <= pz < z * anisotropy and r + 2 <= py <= h - r - 2 and r + 2 <= px <= w - r - 2):
            continue
        if any(np.linalg.norm([pz - a, py - b, px - c]) < 1.05 * (r + rr)
               for j, (a, b, c, rr) in enumerate(centres) if j != neighbour):
            continue
        if _ellipsoid(rng, label, profile, (pz / anisotropy, py, px), (rz_phys / anisotropy, ry, rx),
                      rng.uniform(0, np.pi), len(centres) + 1):
            centres.append((pz, py, px, r))
    clean = _background(rng, h, w)[None] + profile * (1.0 + _texture(rng, (z, h, w), (2.0 / anisotropy, 2.0, 2.0)))
    return acquire(rng, clean, (1.2 / anisotropy, 1.2, 1.2)), label


@dataclass
class _Nucleus:
    track: int
    y: float
    x: float
    ry: float
    rx: float
    theta: float
    vy: float
    vx: float
    brightness: float


def _paint(nuclei: list[_Nucleus], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((h, w), np.int32)
    profile = np.zeros((h, w), np.float32)
    for n in nuclei:
        r = max(n.ry, n.rx)
        y0, y1, x0, x1 = int(max(n.y - r - 1, 0)), int(min(n.y + r + 2, h)), int(max(n.x - r - 1, 0)), int(min(n.x + r + 2, w))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - n.y, xx - n.x
        u = (dx * np.cos(n.theta) + dy * np.sin(n.theta)) / n.rx
        v = (-dx * np.sin(n.theta) + dy * np.cos(n.theta)) / n.ry
        rho2 = u * u + v * v
        inside = (rho2 <= 1.0) & (label[y0:y1, x0:x1] == 0)
        label[y0:y1, x0:x1][inside] = n.track
        profile[y0:y1, x0:x1][inside] = n.brightness * (1.0 - 0.35 * rho2[inside])
    return label, profile


def _free(nuclei: list[_Nucleus], y: float, x: float, r: float, h: int, w: int, skip=()) -> bool:
    if not (r + 2 <= y <= h - r - 2 and r + 2 <= x <= w - r - 2):
        return False
    return all(np.hypot(y - n.y, x - n.x) >= 1.1 * (r + max(n.ry, n.rx)) for n in nuclei if n.track not in skip)


def synthetic_movie(n_frames: int = 20, size: int = 256, seed: int | list[int] = 0,
                    n_objects: int | tuple[int, int] = (8, 12), radius: tuple[float, float] = (9.0, 14.0),
                    speed: float = 2.0, divisions: int = 3) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """A 2D+t movie (uint16 T x H x W), its tracked labels (int32, the track id of each nucleus) and the
    lineage: one (track id, first frame, last frame, parent track id or 0) per track.

    Nuclei move ``speed`` px per frame on average (never into each other); ``divisions`` of them
    (when room allows) divide in the middle half of the movie into two daughters of 3/4 the radius."""
    h = w = int(size)
    if n_frames < 2 or 2 * radius[1] + 4 > size or not 0 < radius[0] <= radius[1]:
        raise PeftExportError(f"synthetic movie: need >= 2 frames and nuclei that fit {size} px; got {n_frames} "
                              f"frames, radius {radius}")
    rng = np.random.default_rng(seed)
    lo, hi = n_objects if isinstance(n_objects, tuple) else (n_objects, n_objects)
    target = int(rng.integers(lo, hi + 1))
    nuclei: list[_Nucleus] = []
    tracks: dict[int, list[int]] = {}  # id -> [first, last, parent]
    for _ in range(300 * target):
        if len(nuclei) == target:
            break
        ry, rx = rng.uniform(*radius, 2)
        y, x = rng.uniform(radius[1] + 2, h - radius[1] - 2, 2)
        if _free(nuclei, y, x, max(ry, rx), h, w):
            angle = rng.uniform(0, 2 * np.pi)
            v = speed * rng.uniform(0.5, 1.5)
            nuclei.append(_Nucleus(len(nuclei) + 1, y, x, ry, rx, rng.uniform(0, np.pi), v * np.sin(angle),
                                   v * np.cos(angle), rng.uniform(600.0, 2000.0)))
            tracks[len(nuclei)] = [0, 0, 0]
    at = sorted(rng.integers(max(1, n_frames // 4), max(2, 3 * n_frames // 4), size=divisions).tolist())
    background = _background(rng, h, w)
    images, labels = [], []
    for t in range(n_frames):
        while at and at[0] == t and nuclei:
            at.pop(0)
            _divide(rng, nuclei, tracks, t, h, w)
        label, profile = _paint(nuclei, h, w)
        for n in nuclei:
            tracks[n.track][1] = t
        clean = background + profile * (1.0 + _texture(rng, (h, w), 2.0))
        images.append(acquire(rng, clean, 1.2))
        labels.append(label)
        for n in nuclei:  # move, bouncing off the borders and off each other
            ny, nx = n.y + n.vy + rng.normal(0, 0.3), n.x + n.vx + rng.normal(0, 0.3)
            if _free(nuclei, ny, nx, max(n.ry, n.rx), h, w, skip=(n.track,)):
                n.y, n.x = ny, nx
            else:
                n.vy, n.vx = -n.vy, -n.vx
            n.theta += rng.normal(0, 0.05)
    lineage = [(k, a, b, p) for k, (a, b, p) in sorted(tracks.items())]
    return np.stack(images), np.stack(labels), lineage


def _divide(rng: np.random.Generator, nuclei: list[_Nucleus], tracks: dict, t: int, h: int, w: int) -> None:
    """The largest nucleus that has room divides at frame ``t``: its track ends at t - 1."""
    for parent in sorted(nuclei, key=lambda n: -max(n.ry, n.rx)):
        r = 0.75 * max(parent.ry, parent.rx)
        for angle in rng.uniform(0, np.pi, 8):
            d = 1.15 * r
            oy, ox = d * np.sin(angle), d * np.cos(angle)
            spots = [(parent.y + oy, parent.x + ox), (parent.y - oy, parent.x - ox)]
            if not all(_free(nuclei, y, x, r, h, w, skip=(parent.track,)) for y, x in spots):
                continue
            nuclei.remove(parent)
            for sign, (y, x) in zip((1, -1), spots):
                k = max(tracks) + 1
                tracks[k] = [t, t, parent.track]
                v = np.hypot(parent.vy, parent.vx)
                nuclei.append(_Nucleus(k, y, x, 0.75 * parent.ry, 0.75 * parent.rx, parent.theta,
                                       sign * v * np.sin(angle), sign * v * np.cos(angle), parent.brightness))
            return


def make_volume_data(out_dir: str | os.PathLike, n_volumes: int = 2, shape: tuple[int, int, int] = (32, 256, 256),
                     seed: int = 0, anisotropy: float = 2.0, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """``out_dir/images/volume_XXX.tif`` (uint16 ZYX, axes written) and ``labels/volume_XXX.tif``
    (int32 ZYX): finetune reads them plane by plane, ``predict --3d`` and ``evaluate --3d`` as stacks."""
    return _write(out_dir, "volume", n_volumes, overwrite, "ZYX",
                  lambda i: synthetic_volume(shape, [seed, i], anisotropy=anisotropy) + (None,))


def make_movie_data(out_dir: str | os.PathLike, n_movies: int = 1, n_frames: int = 20, size: int = 256,
                    seed: int = 0, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """``out_dir/images/movie_XXX.tif`` (uint16 TYX), ``labels/movie_XXX.tif`` (tracked labels) and
    ``labels/movie_XXX_track.txt`` (the CTC lineage), for ``predict --track`` / ``evaluate --track``."""
    return _write(out_dir, "movie", n_movies, overwrite, "TYX",
                  lambda i: synthetic_movie(n_frames, size, [seed, i]))


def _write(out_dir, stem: str, n: int, overwrite: bool, axes: str, make) -> list[tuple[Path, Path]]:
    import tifffile

    if n < 1:
        raise PeftExportError(f"number of {stem}s: must be >= 1, got {n}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        image, label, lineage = make(i)
        name = f"{stem}_{i:03d}"
        img, lab = out_dir / "images" / f"{name}.tif", out_dir / "labels" / f"{name}.tif"
        for path, arr in ((img, image), (lab, label)):
            with atomic_file(path, overwrite) as tmp:
                tifffile.imwrite(tmp, arr, metadata={"axes": axes}, photometric="minisblack")
        if lineage is not None:
            write_ctc_tracks(out_dir / "labels" / f"{name}{CTC_TRACKS_SUFFIX}", lineage, overwrite)
        written.append((img, lab))
    return written
