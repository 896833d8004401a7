"""The images and prompts the int8 recipe is tuned on, and the other ones its gate verifies on.

A margin measured on the data the recipe was tuned on says little about other images, so the
int8 encoder never meets its gate's data before the gate:

* **tuning** (GPTQ's layer statistics, static calibration ranges, the layer sensitivity ranking and
  the search's agreement at each step, ``int8_search``): without ``--calibration-data`` probe
  images of seeds 1 and 2 (``SEARCH_SEEDS``) with 32 prompts of seed 1; with it, the user's images
  less a held-out part, with the same prompts;
* **gate** (``gates.THRESHOLDS["int8"]``, on every verifying backend): the probe image of seed 0
  with its 32 prompts of seed 0, as for every precision, and with ``--calibration-data`` the
  held-out part of the user's images (one plane in ``HELD_OUT_EVERY``, at least one when there are
  two or more, at most ``MAX_HELD_OUT``), each with the gate's 32 prompts. Both must pass.

Both families follow it (SAM 2's probe images go through SAM 2's normalisation: ``probe``).
``split_int8_data`` makes the split and the manifest's record of it (``int8_data``);
``quantise_tuned`` makes the int8 graph from the tuning side only; ``Agreement`` measures a candidate
graph's masks against the torch model on a set of images; ``with_held_out`` (``int8_verifier`` for
SAM's pipeline) adds the held-out images to the gate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..models.family import is_sam2
from .agreement import GATES, mask_agreement
from .gates import graph_runner, judge
from .quantize import Int8Recipe, default_recipe, quantize_int8

SEARCH_SEEDS = (1, 2)  # probe images the recipe is tuned on; the gate's probe image is seed 0
SEARCH_PROMPT_SEED = 1  # the search's 32 prompts; the gate's are seed 0 (agreement.gate_prompts)
GATE_PROMPT_SEED = 0
SEARCH_IMAGES = 2  # tuning images the search measures agreement on at each step (each costs an encoder run)
HELD_OUT_EVERY = 4
MAX_HELD_OUT = 4
HELD_OUT_MEASURES = ("held_out_prompt_mask_iou_mean", "held_out_prompt_mask_iou_min")


@dataclass
class Int8Data:
    """Encoder inputs (1,3,S,S) on each side of the split, and the manifest's record of it."""

    tuning: list[np.ndarray]
    calibration: list[np.ndarray] | None  # static QDQ ranges: the user's tuning images; None: dynamic
    held_out: list[np.ndarray] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def held_out_indices(n: int) -> list[int]:
    """Which of ``n`` calibration planes the gate keeps for itself: spread over the sorted list."""
    if n < 2:
        return []
    k = min(MAX_HELD_OUT, max(1, n // HELD_OUT_EVERY))
    return sorted({int((j + 1) * n / (k + 1)) for j in range(k)})


def sam_probe_image(image_size: int, seed: int) -> np.ndarray:
    """SAM's probe image of ``seed`` as the encoder's input (``merge.probe_inputs``)."""
    from ..merge import probe_inputs

    return probe_inputs(image_size, seed)[0].numpy()


def split_int8_data(image_size: int, calibration: Sequence[np.ndarray] | None = None,
                    calibration_record: dict | None = None,
                    probe: Callable[[int, int], np.ndarray] = sam_probe_image) -> Int8Data:
    """Tuning and gate data of one int8 export; ``calibration``: the user's planes (``calibration_inputs``);
    ``probe(image_size, seed)``: the family's probe image as its encoder input (SAM's by default)."""
    prompts = GATES["int8"]["prompts"]
    gate = {"images": ["probe image, seed 0"], "prompts": f"{prompts} gate prompts of seed {GATE_PROMPT_SEED} per image"}
    tune = {"prompts": f"{prompts} gate prompts of seed {SEARCH_PROMPT_SEED} per image",
            "used_for": "GPTQ rounding, static calibration ranges, layer sensitivity, the recipe search's agreement"}
    if not calibration:
        tune["images"] = [f"probe image, seed {s}" for s in SEARCH_SEEDS]
        tuning = [probe(image_size, seed) for seed in SEARCH_SEEDS]
        return Int8Data(tuning, None, [], {"tuning": tune, "gate": gate})
    sources = (calibration_record or {}).get("plane_sources") or [f"plane {i}" for i in range(len(calibration))]
    held = held_out_indices(len(calibration))
    tuning = [x for i, x in enumerate(calibration) if i not in held]
    tune["images"] = [s for i, s in enumerate(sources) if i not in held]
    gate["images"] += [sources[i] for i in held]
    if not held:
        gate["note"] = ("one calibration plane: it is used for tuning, so the gate measures on the probe image "
                        "only; give two or more images to hold one out")
    return Int8Data(tuning, tuning, [calibration[i] for i in held], {"tuning": tune, "gate": gate})


class Agreement:
    """Per-prompt mask agreement of a candidate encoder graph with the torch model on ``images``
    (``agreement.mask_agreement`` per image, pooled; SAM 2: ``sam2_mask_agreement`` on the graph's three
    outputs): the torch encoder runs once per image."""

    def __init__(self, model: nn.Module, images: Sequence[np.ndarray], prompt_seed: int) -> None:
        self.model, self.images, self.seed = model, list(images), prompt_seed
        self._reference: list | None = None
        if is_sam2(model):
            from .sam2_image_graphs import ENCODER_OUTPUTS, sam2_encoder_outputs, sam2_mask_agreement

            self._encode = lambda x: sam2_encoder_outputs(model, x)
            self._agree = lambda ref, out, n: sam2_mask_agreement(model, ref, tuple(out[k] for k in ENCODER_OUTPUTS),
                                                                  n, prompt_seed)
        else:
            self._encode = lambda x: model.image_encoder(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            self._agree = lambda ref, out, n: mask_agreement(model, ref, out["image_embeddings"], n, prompt_seed)

    def reference(self) -> list:
        if self._reference is None:
            with torch.no_grad():
                self._reference = [self._encode(x) for x in self.images]
        return self._reference

    def __call__(self, path: str | os.PathLike, backend: str = "onnxruntime") -> dict:
        run = graph_runner(path, backend)
        n = int(GATES["int8"]["prompts"])
        per_image, ious = [], []
        for x, ref in zip(self.images, self.reference()):
            a = self._agree(ref, run({"image": np.ascontiguousarray(x, np.float32)}), n)
            per_image.append({"mask_iou_mean": a["mask_iou_mean"], "mask_iou_min": a["mask_iou_min"]})
            ious += a["per_prompt"]
        return {"images": len(self.images), "prompts": n, "prompt_seed": self.seed,
                "mask_iou_mean": float(np.mean(ious)), "mask_iou_min": float(np.min(ious)), "per_image": per_image}


def quantise_tuned(model: nn.Module, src: str | os.PathLike, dst: str | os.PathLike, data: Int8Data,
                   model_type: str, recipe: Int8Recipe | None = None,
                   log: Callable[[str], None] = lambda _m: None) -> tuple[Int8Recipe, dict | None]:
    """The int8 encoder ``dst`` from the fp32 ``src``, on ``data``'s tuning side only: the user's ``recipe``
    as given (GPTQ on the tuning images), else the default recipe with layers returned to fp32 until the
    masks agree with margin on the tuning images and prompts (``int8_search``). Returns the applied recipe
    (``rounding`` "gptq" only when GPTQ changed weights) and the search record (None for a given recipe)."""
    from .gptq import gptq_weights
    from .int8_search import search_int8_recipe

    if recipe is not None:
        rounded = gptq_weights(src, data.tuning) if recipe.rounding == "gptq" else None
        return quantize_int8(src, dst, recipe, data.calibration, rounded), None
    tuned = Agreement(model, data.tuning[:SEARCH_IMAGES], SEARCH_PROMPT_SEED)
    return search_int8_recipe(src, dst, default_recipe(Path(src), model_type), data.tuning, tuned, data.calibration,
                              log)


def with_held_out(parity: dict, held_out: Agreement | None, path: str | os.PathLike, backend: str, precision: str,
                  measures: tuple[str, ...]) -> dict:
    """The probe image's check ``parity`` and, with held-out images, their agreement judged with the same
    limits (``measures``: the probe check's, judged again together with the held-out ones)."""
    if held_out is None or not held_out.images:
        return parity
    a = held_out(path, backend)
    parity["held_out_agreement"] = a
    parity["held_out_prompt_mask_iou_mean"], parity["held_out_prompt_mask_iou_min"] = a["mask_iou_mean"], a["mask_iou_min"]
    return judge(parity, precision, tuple(measures) + HELD_OUT_MEASURES)


def int8_verifier(sam: nn.Module, held_out: Agreement | None, measures: tuple[str, ...],
                  verify: Callable) -> Callable:
    """The int8 encoder's gate in SAM's pipeline: ``verify`` (``verify.verify_export`` on the probe image)
    and the held-out images (``with_held_out``)."""
    def verifier(path, reference, precision: str, backend: str) -> dict:
        parity = verify(path, "encoder", sam, reference, precision, backend)
        return with_held_out(parity, held_out, path, backend, precision, measures)

    return verifier
