"""Held-out objects: some of the user's labelled objects are kept out of training to measure
before/after Dice on (the images stay in training; the held-out objects are unlabelled there)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data import Sample
from ..errors import PeftExportError


@dataclass
class HoldOut:
    train: list[Sample]  # labels without the held-out objects (images left without objects dropped)
    check: list[Sample]  # labels with only the held-out objects
    record: dict  # what was held out, for the result and the manifest


def hold_out_objects(samples: list[Sample], fraction: float, seed: int = 0, min_object_size: int = 25) -> HoldOut:
    """Hold out ``fraction`` of all objects with ``min_object_size`` pixels (at least one, at most all
    but one), chosen at random (seeded) across the images."""
    if not 0.0 < fraction < 1.0:
        raise PeftExportError(f"--holdout: must be between 0 and 1, got {fraction}")
    objects = []
    for i, s in enumerate(samples):
        ids, counts = np.unique(s.label, return_counts=True)
        objects += [(i, int(j)) for j, c in zip(ids, counts) if j > 0 and c >= min_object_size]
    if len(objects) < 2:
        raise PeftExportError(
            f"the labels hold {len(objects)} object(s) of at least {min_object_size} pixels; improve needs at least "
            "2 (some to train on, one to check the result on)")
    k = min(max(1, int(round(fraction * len(objects)))), len(objects) - 1)
    chosen = {objects[j] for j in np.random.default_rng([seed, 5]).choice(len(objects), size=k, replace=False)}
    train, check = [], []
    for i, s in enumerate(samples):
        held = [obj for (img, obj) in chosen if img == i]
        mask = np.isin(s.label, held)
        if held:
            check.append(Sample(s.name, s.image, np.where(mask, s.label, 0), s.source))
        rest = np.where(mask, 0, s.label)
        if rest.any():
            train.append(Sample(s.name, s.image, rest, s.source))
    record = {"fraction": fraction, "seed": seed, "objects": len(objects), "held_out": k,
              "per_image": {samples[i].name: sorted(o for (img, o) in chosen if img == i)
                            for i in sorted({img for img, _ in chosen})}}
    return HoldOut(train, check, record)
