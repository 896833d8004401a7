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

``split_int8_data`` makes the split and the manifest's record of it (``int8_data``);
``Agreement`` measures a candidate graph's masks against the torch model on a set of images;
``int8_verifier`` is the gate that adds the held-out images to the probe's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam

from .agreement import GATES, mask_agreement
from .gates import graph_runner, judge

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


def split_int8_data(image_size: int, calibration: Sequence[np.ndarray] | None = None,
                    calibration_record: dict | None = None) -> Int8Data:
    """Tuning and gate data of one int8 export; ``calibration``: the user's planes (``calibration_inputs``)."""
    from ..merge import probe_inputs

    prompts = GATES["int8"]["prompts"]
    gate = {"images": ["probe image, seed 0"], "prompts": f"{prompts} gate prompts of seed {GATE_PROMPT_SEED} per image"}
    tune = {"prompts": f"{prompts} gate prompts of seed {SEARCH_PROMPT_SEED} per image",
            "used_for": "GPTQ rounding, static calibration ranges, layer sensitivity, the recipe search's agreement"}
    if not calibration:
        tune["images"] = [f"probe image, seed {s}" for s in SEARCH_SEEDS]
        tuning = [probe_inputs(image_size, seed)[0].numpy() for seed in SEARCH_SEEDS]
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
    (``agreement.mask_agreement`` per image, pooled): the torch embeddings are computed once."""

    def __init__(self, sam: Sam, images: Sequence[np.ndarray], prompt_seed: int) -> None:
        self.sam, self.images, self.seed = sam, list(images), prompt_seed
        self._reference: list[torch.Tensor] | None = None

    def reference(self) -> list[torch.Tensor]:
        if self._reference is None:
            with torch.no_grad():
                self._reference = [self.sam.image_encoder(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
                                   for x in self.images]
        return self._reference

    def __call__(self, path: str | os.PathLike, backend: str = "onnxruntime") -> dict:
        run = graph_runner(path, backend)
        n = int(GATES["int8"]["prompts"])
        per_image, ious = [], []
        for x, ref in zip(self.images, self.reference()):
            emb = run({"image": np.ascontiguousarray(x, np.float32)})["image_embeddings"]
            a = mask_agreement(self.sam, ref, emb, n, self.seed)
            per_image.append({"mask_iou_mean": a["mask_iou_mean"], "mask_iou_min": a["mask_iou_min"]})
            ious += a["per_prompt"]
        return {"images": len(self.images), "prompts": n, "prompt_seed": self.seed,
                "mask_iou_mean": float(np.mean(ious)), "mask_iou_min": float(np.min(ious)), "per_image": per_image}


def int8_verifier(sam: Sam, held_out: Agreement | None, measures: tuple[str, ...],
                  verify: Callable) -> Callable:
    """The int8 encoder's gate: ``verify`` (the probe image's check) and, with held-out images, their
    agreement judged with the same limits (``measures``: the probe check's, judged again with them)."""
    def verifier(path, reference, precision: str, backend: str) -> dict:
        parity = verify(path, "encoder", sam, reference, precision, backend)
        if held_out is None or not held_out.images:
            return parity
        a = held_out(path, backend)
        parity["held_out_agreement"] = a
        parity["held_out_prompt_mask_iou_mean"], parity["held_out_prompt_mask_iou_min"] = a["mask_iou_mean"], a["mask_iou_min"]
        return judge(parity, precision, tuple(measures) + HELD_OUT_MEASURES)

    return verifier
