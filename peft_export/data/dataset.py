"""Pairing images with labels, validating a whole dataset at once, loading and splitting."""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from ..errors import PeftExportError
from ..runtime.intensity import normalize_intensity
from .io import (
    IMAGE_EXTENSIONS,
    LABEL_KINDS,
    file_stem,
    is_image_file,
    plane_names,
    read_image_planes,
    read_label_planes,
)


@dataclass(frozen=True)
class Pair:
    """An image file and its label file; either may be missing (reported by validate_pairs)."""

    name: str
    image: Path | None
    label: Path | None
    note: str = ""  # a pairing problem found while listing (e.g. two files with one stem)


@dataclass
class Sample:
    """One 2D plane: the normalised image (float32 HxWx3, 0..255) and int32 instance labels."""

    name: str
    image: np.ndarray
    label: np.ndarray
    source: Pair | None = field(default=None, repr=False)


def _pair_files(images: Sequence[Path], labels: Sequence[Path]) -> list[Pair]:
    by_stem: dict[str, dict[str, list[Path]]] = defaultdict(lambda: {"image": [], "label": []})
    for p in images:
        by_stem[file_stem(p)]["image"].append(p)
    for p in labels:
        by_stem[file_stem(p)]["label"].append(p)
    pairs = []
    for stem in sorted(by_stem):
        imgs, lbls = sorted(by_stem[stem]["image"]), sorted(by_stem[stem]["label"])
        note = ""
        if len(imgs) > 1:
            note = f"several images share the name {stem!r}: {', '.join(p.name for p in imgs)}"
        elif len(lbls) > 1:
            note = f"several label files share the name {stem!r}: {', '.join(p.name for p in lbls)}"
        pairs.append(Pair(stem, imgs[0] if imgs else None, lbls[0] if lbls else None, note))
    return pairs


def find_pairs(data_dir: str | os.PathLike) -> list[Pair]:
    """Pair ``data_dir/images/*`` with ``data_dir/labels/*`` by file stem.

    Files without a partner are kept as pairs with ``None`` on one side, so that
    validate_pairs reports them together with every other problem.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise PeftExportError(f"{data_dir}: directory not found")
    if not data_dir.is_dir():
        raise PeftExportError(f"{data_dir}: not a directory (expected one with images/ and labels/)")
    missing = [d for d in ("images", "labels") if not (data_dir / d).is_dir()]
    if missing:
        raise PeftExportError(f"{data_dir}: expected sub-directories 'images' and 'labels' "
                              f"(missing: {', '.join(missing)})")
    images = [p for p in (data_dir / "images").iterdir() if is_image_file(p)]
    labels = [p for p in (data_dir / "labels").iterdir() if is_image_file(p)]
    if not images and not labels:
        raise PeftExportError(f"{data_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in images/ or labels/")
    return _pair_files(images, labels)


def find_pairs_glob(images_glob: str, labels_glob: str) -> list[Pair]:
    """Pair the files matched by two glob patterns (``**`` allowed) by file stem."""
    images = [Path(p) for p in glob.glob(images_glob, recursive=True) if is_image_file(p)]
    labels = [Path(p) for p in glob.glob(labels_glob, recursive=True) if is_image_file(p)]
    if not images:
        raise PeftExportError(f"{images_glob}: matches no image files")
    if not labels:
        raise PeftExportError(f"{labels_glob}: matches no label files")
    return _pair_files(images, labels)


def _plane_shape(plane: np.ndarray) -> tuple[int, int]:
    return tuple(plane.shape[:2])


def _check_and_load(pairs: Sequence[Pair], labels_are: str, intensity_rule: dict | None,
                    keep: bool, what: str) -> list[Sample]:
    """Read every pair, collect every problem, raise one report; return samples when ``keep``."""
    if labels_are not in LABEL_KINDS:
        raise PeftExportError(f"labels_are: must be one of {', '.join(LABEL_KINDS)}, got {labels_are!r}")
    if not pairs:
        raise PeftExportError(f"{what}: no image/label pairs")
    problems: list[str] = []
    samples: list[Sample] = []
    for pair in pairs:
        if pair.note:
            problems.append(f"{pair.image or pair.label}: {pair.note}")
        if pair.image is None:
            problems.append(f"{pair.label}: label file has no image with the name {pair.name!r}")
            continue
        if pair.label is None:
            problems.append(f"{pair.image}: image has no label file with the name {pair.name!r}")
            continue
        images = labels = None
        try:
            images = read_image_planes(pair.image)
        except PeftExportError as e:
            problems.append(str(e))
        try:
            labels = read_label_planes(pair.label, labels_are)
        except PeftExportError as e:
            problems.append(str(e))
        if images is None or labels is None:
            continue
        if len(images) != len(labels):
            problems.append(f"{pair.label}: {len(labels)} label plane(s) but the image {pair.image.name} "
                            f"has {len(images)} plane(s) (shapes: image {len(images)} x "
                            f"{_plane_shape(images[0])}, labels {len(labels)} x {_plane_shape(labels[0])})")
            continue
        bad_shape = [z for z, (im, lb) in enumerate(zip(images, labels)) if _plane_shape(im) != lb.shape]
        if bad_shape:
            problems.append(f"{pair.label}: label shape {labels[0].shape} differs from image "
                            f"{pair.image.name} shape {_plane_shape(images[0])}")
            continue
        if not any(lb.any() for lb in labels):
            problems.append(f"{pair.label}: labels are empty (no object)")
            continue
        if keep:
            for name, im, lb in zip(plane_names(pair.name, len(images)), images, labels):
                samples.append(Sample(name, normalize_intensity(im, intensity_rule), lb, pair))
    if problems:
        n = len(problems)
        head = f"{n} problem{'s' if n != 1 else ''} in {what}:"
        raise PeftExportError("\n".join([head] + [f"  {p}" for p in problems]))
    return samples


def validate_pairs(pairs: Sequence[Pair], labels_are: str = "instance", what: str = "training data") -> list[Pair]:
    """Read every file and raise ONE PeftExportError listing all problems; return ``pairs``.

    Problems: missing partner, unreadable/corrupt file, unsupported layout, negative
    or non-integer label values, plane count or HxW mismatch, labels without objects.
    """
    _check_and_load(pairs, labels_are, None, keep=False, what=what)
    return list(pairs)


def load_samples(pairs: Sequence[Pair], labels_are: str = "instance", intensity_rule: dict | None = None,
                 what: str = "training data") -> list[Sample]:
    """Validate (as validate_pairs) and load all planes as normalised samples in one pass.

    Planes of a z-stack become samples ``stem[z]``; stack planes without objects are kept
    (the patch sampler skips them).
    """
    return _check_and_load(pairs, labels_are, intensity_rule, keep=True, what=what)


T = TypeVar("T")


def split_by_file(pairs: Sequence[T], val_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministic train/validation split by file (all planes of a stack stay on one side).

    With 0 < val_fraction < 1 and at least two files, each side gets at least one file.
    ``val_fraction == 0`` puts everything in training. Both lists keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise PeftExportError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    n = len(pairs)
    if n < 2 or val_fraction == 0.0:
        return list(pairs), []
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    # order by name first so the split does not depend on directory listing order
    names = [str(getattr(p, "name", p)) for p in pairs]
    by_name = sorted(range(n), key=lambda i: names[i])
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = {by_name[i] for i in perm[:n_val]}
    train = [p for i, p in enumerate(pairs) if i not in val_idx]
    val = [p for i, p in enumerate(pairs) if i in val_idx]
    return train, val
