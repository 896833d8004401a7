"""The paper's evaluation protocol, for any predictor with SamPredictor's interface.

Interactive segmentation (Dice and IoU per object): one positive point, one box,
and iterative prompting that starts from the point or the box and adds one
corrective point per iteration. Automatic segmentation: mSA over IoU thresholds
0.5:0.95. Nothing here builds a model.

A predictor needs two methods, exactly as ``segment_anything.SamPredictor``:

* ``set_image(image)`` with an HxWx3 uint8 image (samples may hold HxW or float 0..255
  images, e.g. after intensity normalisation: they are repeated to 3 channels and rounded
  to uint8 before ``set_image``);
* ``predict(point_coords=None, point_labels=None, box=None, mask_input=None,
  multimask_output=True) -> (masks (C,H,W) bool, iou_scores (C,), low_res_logits (C,h,w))``.

Protocol, as in micro-sam's evaluation (``run_inference_with_iterative_prompting``):

* a single positive point is ambiguous, so it is run with ``multimask_output=True``
  and the mask with the highest predicted IoU is kept; a box, and every call with
  more than one prompt, uses ``multimask_output=False``;
* iterative prompting: iteration 0 is the initial prompt (point or box); each of
  the following ``iterations`` rounds adds one corrective point taken from the
  largest error region of the current prediction (positive if missed foreground
  dominates, negative otherwise; ``data.prompts.corrective_point``) and feeds the
  previous low-res logits of the kept mask back as ``mask_input``. The box, when
  the run started from one, stays in every call. When the prediction is already
  perfect there is nothing to correct and it is kept for the remaining rounds.
  (micro-sam's evaluation counts the initial prompt among its ``n_iterations`` and
  leaves ``use_masks`` off by default; here the initial prompt is iteration 0 and
  logits are always fed back, as in its training.)
* Dice and IoU are computed per object, averaged over the objects of an image,
  then over images (images without objects are skipped and counted).

Prompts come from ground truth only and are seeded per (seed, image name, object
id), so every model sees the same initial point and box; corrective points depend
on each model's own errors, but their random choices are drawn from the same
per-object stream.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..data.prompts import box_from_mask, corrective_point, sample_positive_point
from ..errors import PeftExportError
from .metrics import DEFAULT_THRESHOLDS, dice, iou, mean_segmentation_accuracy
from ..runtime.preprocess import to_uint8

PROMPT_TYPES = ("point", "box", "iterative")
START_TYPES = ("point", "box")


@dataclass
class ObjectPrompt:
    """The ground-truth-derived prompts of one object."""

    object_id: int
    point: tuple[float, float]  # (x, y) in image pixels
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1)
    seed: tuple[int, ...]  # entropy of this object's random stream

    def corrective_rng(self, start: str) -> np.random.Generator:
        """A fresh generator for corrective points; the same for every model and run."""
        return np.random.default_rng(np.random.SeedSequence(self.seed + (START_TYPES.index(start) + 1,)))


@dataclass
class PromptPlan:
    """Prompts for every evaluated object of one image, derived deterministically from its labels."""

    name: str
    objects: list[ObjectPrompt] = field(default_factory=list)

    @classmethod
    def from_labels(cls, labels: np.ndarray, name: str, seed: int = 0,
                    max_objects: int | None = None) -> "PromptPlan":
        labels = np.asarray(labels)
        ids = np.unique(labels)
        ids = ids[ids != 0]
        image_key = zlib.crc32(name.encode("utf-8"))  # stable across processes, unlike hash()
        if max_objects is not None and ids.size > max_objects:
            pick = np.random.default_rng([seed, image_key]).choice(ids.size, size=max_objects, replace=False)
            ids = ids[np.sort(pick)]
        objects = []
        for oid in ids:
            entropy = (int(seed), image_key, int(oid))
            mask = labels == oid
            rng = np.random.default_rng(np.random.SeedSequence(entropy + (0,)))
            x, y = sample_positive_point(mask, rng)
            box = tuple(float(v) for v in box_from_mask(mask))
            objects.append(ObjectPrompt(int(oid), (float(x), float(y)), box, entropy))
        return cls(name, objects)


def _as_predictor_image(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    elif image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise PeftExportError(f"{name}: expected an HxW or HxWx3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        # SAM's preprocessing resizes a uint8 image (ResizeLongestSide), and SamPredictor
        # misreads floats as 0..1; so 0..255 floats are rounded to uint8 here, once, for every model.
        image = to_uint8(image)
    return image


def _check_labels(labels: np.ndarray, image: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape != image.shape[:2]:
        raise PeftExportError(f"{name}: label shape {labels.shape} does not match image shape {image.shape[:2]}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise PeftExportError(f"{name}: labels must be integer instance ids")
        labels = labels.astype(np.int64)
    return labels


def _predict(predictor: Any, points: list, point_labels: list, box, mask_input, multimask: bool):
    kwargs: dict[str, Any] = {"multimask_output": multimask}
    if points:
        kwargs["point_coords"] = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        kwargs["point_labels"] = np.asarray(point_labels, dtype=np.int64)
    if box is not None:
        kwargs["box"] = np.asarray(box, dtype=np.float32)
    if mask_input is not None:
        kwargs["mask_input"] = mask_input
    masks, scores, logits = predictor.predict(**kwargs)
    masks = np.asarray(masks)
    scores = np.asarray(scores).reshape(-1)
    # Highest predicted IoU decides among multimask outputs (a single output: index 0).
    k = int(np.argmax(scores)) if multimask and scores.size > 1 else 0
    return masks[k].astype(bool), np.asarray(logits)[k][None].astype(np.float32)


def _evaluate_object(predictor, obj: ObjectPrompt, gt: np.ndarray, prompts: Sequence[str],
                     starts: Sequence[str], iterations: int) -> dict:
    out: dict[str, Any] = {}
    first: dict[str, tuple] = {}
    if "point" in prompts or ("iterative" in prompts and "point" in starts):
        first["point"] = _predict(predictor, [obj.point], [1], None, None, True)
    if "box" in prompts or ("iterative" in prompts and "box" in starts):
        first["box"] = _predict(predictor, [], [], obj.box, None, False)
    for kind in ("point", "box"):
        if kind in prompts:
            mask = first[kind][0]
            out[kind] = {"dice": dice(mask, gt), "iou": iou(mask, gt)}
    if "iterative" in prompts:
        for start in starts:
            mask, logits = first[start]
            box = obj.box if start == "box" else None
            points = [obj.point] if start == "point" else []
            labels = [1] if start == "point" else []
            rng = obj.corrective_rng(start)
            dices, ious = [dice(mask, gt)], [iou(mask, gt)]
            for _ in range(iterations):
                step = corrective_point(mask, gt, rng)
                if step is not None:
                    x, y, lab = step
                    points.append((float(x), float(y)))
                    labels.append(int(lab))
                    mask, logits = _predict(predictor, points, labels, box, logits, False)
                dices.append(dice(mask, gt))
                ious.append(iou(mask, gt))
            out[f"iterative_{start}"] = {"dice_curve": dices, "iou_curve": ious,
                                         "points": [list(p) for p in points], "point_labels": labels}
    return out


def _parse_starts(start: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(start, str):
        starts = START_TYPES if start == "both" else (start,)
    else:
        starts = tuple(start)
    bad = [s for s in starts if s not in START_TYPES]
    if bad or not starts:
        raise PeftExportError(f"--start: must be 'point', 'box' or 'both', got {start!r}")
    return starts


def _progress(samples: Iterable, progress: bool, desc: str) -> Iterable:
    if not progress:
        return samples
    try:
        from tqdm import tqdm
    except ImportError:
        return samples
    return tqdm(samples, desc=desc, unit="image")


def evaluate_interactive(
    predictor: Any,
    samples: Iterable[tuple[np.ndarray, np.ndarray, str]],
    prompts: Sequence[str] = PROMPT_TYPES,
    iterations: int = 8,
    start: str | Sequence[str] = "both",
    seed: int = 0,
    max_objects_per_image: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the interactive protocol over ``samples`` of (image, instance labels, name).

    Returns a JSON-able dict: ``metrics`` maps ``point`` / ``box`` to mean
    ``{"dice", "iou"}`` and ``iterative_point`` / ``iterative_box`` to
    ``{"dice", "iou"}`` after the last iteration plus ``dice_curve`` / ``iou_curve``
    (``iterations + 1`` values, index 0 = the initial prompt); ``per_image`` holds the
    same per image with per-object values (``objects``) and the prompts used.
    """
    prompts = tuple(prompts)
    bad = [p for p in prompts if p not in PROMPT_TYPES]
    if bad or not prompts:
        raise PeftExportError(f"--prompts: unknown prompt type(s) {bad}; choose from {list(PROMPT_TYPES)}")
    if iterations < 0:
        raise PeftExportError(f"--iterations: must be >= 0, got {iterations}")
    starts = _parse_starts(start) if "iterative" in prompts else ()
    keys = [k for k in ("point", "box") if k in prompts] + [f"iterative_{s}" for s in starts]

    per_image = []
    n_skipped = 0
    for image, labels, name in _progress(samples, progress, "evaluate"):
        name = str(name)
        image = _as_predictor_image(image, name)
        labels = _check_labels(labels, image, name)
        plan = PromptPlan.from_labels(labels, name, seed=seed, max_objects=max_objects_per_image)
        if not plan.objects:
            n_skipped += 1
            continue
        predictor.set_image(image)
        objects = []
        for obj in plan.objects:
            res = _evaluate_object(predictor, obj, labels == obj.object_id, prompts, starts, iterations)
            objects.append({"object_id": obj.object_id, "prompt_point": list(obj.point),
                            "prompt_box": list(obj.box), **res})
        entry: dict[str, Any] = {"name": name, "n_objects": len(objects), "objects": objects}
        for k in keys:
            if k.startswith("iterative"):
                dc = np.mean([o[k]["dice_curve"] for o in objects], axis=0)
                ic = np.mean([o[k]["iou_curve"] for o in objects], axis=0)
                entry[k] = {"dice": float(dc[-1]), "iou": float(ic[-1]),
                            "dice_curve": dc.tolist(), "iou_curve": ic.tolist()}
            else:
                entry[k] = {"dice": float(np.mean([o[k]["dice"] for o in objects])),
                            "iou": float(np.mean([o[k]["iou"] for o in objects]))}
        per_image.append(entry)

    metrics: dict[str, dict] = {}
    for k in keys:
        if not per_image:
            metrics[k] = {"dice": None, "iou": None}
            continue
        metrics[k] = {"dice": float(np.mean([e[k]["dice"] for e in per_image])),
                      "iou": float(np.mean([e[k]["iou"] for e in per_image]))}
        if k.startswith("iterative"):
            metrics[k]["dice_curve"] = np.mean([e[k]["dice_curve"] for e in per_image], axis=0).tolist()
            metrics[k]["iou_curve"] = np.mean([e[k]["iou_curve"] for e in per_image], axis=0).tolist()
    return {
        "protocol": {"prompts": list(prompts), "starts": list(starts), "iterations": iterations,
                     "seed": seed, "max_objects_per_image": max_objects_per_image,
                     "point_multimask": True, "select": "highest predicted IoU",
                     "mask_input_fed_back": True},
        "n_images": len(per_image),
        "n_images_without_objects": n_skipped,
        "n_objects": int(sum(e["n_objects"] for e in per_image)),
        "metrics": metrics,
        "per_image": per_image,
    }


def evaluate_automatic(
    segment_fn: Callable[[np.ndarray], np.ndarray],
    samples: Iterable[tuple[np.ndarray, np.ndarray, str]],
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
    progress: bool = True,
) -> dict:
    """Automatic instance segmentation: ``segment_fn(image) -> labels``; mSA and SA per threshold.

    Scores are computed per image and averaged over images (as micro-sam does).
    """
    per_image = []
    for image, labels, name in _progress(samples, progress, "evaluate-automatic"):
        name = str(name)
        image = _as_predictor_image(image, name)
        labels = _check_labels(labels, image, name)
        pred = np.asarray(segment_fn(image))
        if pred.shape != labels.shape:
            raise PeftExportError(f"{name}: segmentation shape {pred.shape} does not match labels {labels.shape}")
        msa, per = mean_segmentation_accuracy(pred, labels, thresholds)
        per_image.append({"name": name, "msa": msa, "sa": {str(t): v for t, v in per.items()},
                          "n_pred": int(np.unique(pred[pred != 0]).size),
                          "n_gt": int(np.unique(labels[labels != 0]).size)})
    if per_image:
        sa_keys = list(per_image[0]["sa"])
        sa = {t: float(np.mean([e["sa"][t] for e in per_image])) for t in sa_keys}
        msa = float(np.mean([e["msa"] for e in per_image]))
    else:
        sa, msa = {}, None
    return {"n_images": len(per_image), "msa": msa, "sa50": sa.get("0.5"), "sa75": sa.get("0.75"),
            "sa": sa, "per_image": per_image}
