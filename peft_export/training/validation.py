"""Training and validation data of a run, and validation by the paper's protocol (point and box Dice)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from ..data import Sample, find_pairs, find_pairs_glob, load_samples, sample_patch, split_by_file
from ..data.labels import remove_small_objects
from ..errors import PeftExportError
from ..models.family import image_predictor
from .config import TrainConfig


def load_split(config: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """Training and validation samples; every data problem of both sets in one report."""
    if config.data and (config.images or config.labels):
        raise PeftExportError("--data: give either --data DIR or --images/--labels, not both")
    if not config.data and not (config.images and config.labels):
        raise PeftExportError("--data: give --data DIR (with images/ and labels/) or both --images and --labels")
    pairs = find_pairs(config.data) if config.data else find_pairs_glob(config.images, config.labels)
    if config.val_data:
        train_pairs, val_pairs = pairs, find_pairs(config.val_data)
    else:
        train_pairs, val_pairs = split_by_file(pairs, config.val_fraction, config.seed)
    problems, train, val = [], [], []
    try:
        train = load_samples(train_pairs, config.labels_are, config.intensity, what="training data")
    except PeftExportError as exc:
        problems.append(str(exc))
    if val_pairs:
        try:
            val = load_samples(val_pairs, config.labels_are, config.intensity, what="validation data")
        except PeftExportError as exc:
            problems.append(str(exc))
    if problems:
        raise PeftExportError("\n".join(problems))
    return train, val


def fit_patch_size(c: TrainConfig, train: Sequence[Sample], log: Callable[[str], None]) -> TrainConfig:
    """A patch larger than every training image would only add zero padding (and shrink the
    objects when the patch is resized to the model's input): use the largest image side instead."""
    largest = max(max(s.label.shape) for s in train)
    if c.patch_size <= largest:
        return c
    log(f"note: the patch size {c.patch_size} (--patch-size) is larger than every training image (the largest side is "
        f"{largest} px): training on {largest}x{largest} patches instead")
    return dataclasses.replace(c, patch_size=largest)


def validation_set(samples: Sequence[Sample], patch_size: int, min_object_size: int, seed: int
                   ) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Fixed validation images: the whole plane when it fits a patch, else one seeded crop.

    Objects under ``min_object_size`` pixels are dropped, as in training. Planes without
    an eligible object are left out.
    """
    out = []
    for i, s in enumerate(samples):
        h, w = s.label.shape
        if h <= patch_size and w <= patch_size:
            label = remove_small_objects(s.label, min_object_size)
            image = s.image
        else:
            try:
                image, label = sample_patch(s.image, s.label, np.random.default_rng([seed, i, 7]), patch_size,
                                            min_object_size, augment=False)
            except PeftExportError:
                continue
        if label.any():
            out.append((image, label, s.name))
    return out


def validate(model: Sam, val_set: Sequence[tuple[np.ndarray, np.ndarray, str]], seed: int = 0,
             max_objects: int | None = 25, predictor: SamPredictor | None = None) -> dict:
    """Point and box Dice of any SAM (adapted, merged, plain) on a validation set.

    Uses the evaluation protocol of ``peft_export.evaluate`` through SamPredictor, i.e. the
    same preprocessing as inference; ``mean_dice`` (the mean of point and box Dice) ranks
    adapters. ``predictor``: one over ``model`` that finds embeddings elsewhere (``CachedPredictor``).
    """
    from ..evaluation.protocol import evaluate_interactive

    was_training = model.training
    model.eval()
    try:
        res = evaluate_interactive(predictor or image_predictor(model), val_set, prompts=("point", "box"), iterations=0,
                                   seed=seed, max_objects_per_image=max_objects, progress=False)
    finally:
        model.train(was_training)
    m = res["metrics"]
    out = {"point_dice": m["point"]["dice"], "box_dice": m["box"]["dice"],
           "point_iou": m["point"]["iou"], "box_iou": m["box"]["iou"],
           "n_images": res["n_images"], "n_objects": res["n_objects"]}
    out["mean_dice"] = None if out["point_dice"] is None else 0.5 * (out["point_dice"] + out["box_dice"])
    return out
