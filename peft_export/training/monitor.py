"""Learning curves: held-out Dice of the model in training, measured without steering the run.

    summary = Trainer(config, samples=(train, []), monitor=Monitor(held_out, every=5)).run()
    summary["monitor"]["points"]  # [{"step": 0, "train_seconds": ..., "box_dice": ...}, ...]

Unlike validation, a measurement here changes nothing the run does: it steps no lr scheduler, counts
towards no early stopping and saves no "best" adapter; each module's train/eval flag and the global
random states are put back as they were, and the embeddings of the held-out images are kept in the
monitor's own cache (the training's cache, its counts and its encoding time stay the run's). So the
final adapter is the one a run without the monitor trains, and ``train_seconds`` (the run's wall
time so far) leaves the measurements' time out. Benchmarks use it for time-to-target readings
(``benchmarks/bench_improve.py``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam

from ..data import Sample
from ..errors import PeftExportError
from .embedding_cache import EmbeddingCache, encoder_digest
from .validation import validate


@dataclass
class Monitor:
    """Measure point and box Dice on ``samples`` before the first step, every ``every`` steps and
    after the last; ``max_objects``: per image (None: all, as ``improve``'s held-out scores)."""

    samples: Sequence[Sample]
    every: int
    max_objects: int | None = None
    points: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # all measurements together: left out of the run's training seconds
    _cache: EmbeddingCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise PeftExportError(f"monitor: measure every >= 1 steps, got {self.every}")
        if not self.samples:
            raise PeftExportError("monitor: no samples to measure on")

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def measure(self, sam: Sam, val_set: Sequence[tuple[np.ndarray, np.ndarray, str]], seed: int, step: int,
                train_seconds: float, extra: dict | None = None) -> dict:
        """One curve point; its own time goes to ``seconds``, not to ``train_seconds``."""
        t0 = time.perf_counter()
        flags = [(m, m.training) for m in sam.modules()]  # validate() would set train() on all of them
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                digest = encoder_digest(sam)  # an encoder that trains gets a new cache (never a stale embedding)
                if self._cache is None or self._cache.digest != digest:
                    self._cache = EmbeddingCache(sam)
                metrics = validate(sam, val_set, seed, self.max_objects, predictor=self._cache.predictor(sam))
        finally:
            for module, training in flags:
                module.training = training
            np.random.set_state(np_state)
            random.setstate(py_state)
        took = time.perf_counter() - t0
        self.seconds += took
        point = {"step": step, "train_seconds": round(train_seconds, 3), "box_dice": metrics["box_dice"],
                 "point_dice": metrics["point_dice"], "objects": metrics["n_objects"], "seconds": round(took, 3),
                 **(extra or {})}
        self.points.append(point)
        return point

    def record(self) -> dict:
        return {"every": self.every, "points": list(self.points), "seconds": round(self.seconds, 2)}
