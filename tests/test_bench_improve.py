"""benchmarks/bench_improve.py's time-to-target reading: the first decoder curve point with >= 80 % of the
encoder case's final gain, over the encoder case's whole training seconds."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_improve import time_to_target  # noqa: E402


def _curve(*points: tuple[int, float, float]) -> list[dict]:
    return [{"step": s, "train_seconds": t, "box_dice": d} for s, t, d in points]


def test_time_to_target_reads_the_first_point_at_80_percent_of_the_final_encoder_gain():
    encoder = _curve((0, 0.5, 0.40), (5, 10.0, 0.60), (10, 20.0, 0.50))  # final gain 0.10 (not its best, 0.20)
    decoder = _curve((0, 0.2, 0.40), (5, 1.0, 0.47), (10, 2.0, 0.49), (15, 3.0, 0.60))
    t = time_to_target(decoder, encoder)
    assert abs(t["encoder_gain"] - 0.10) < 1e-12 and t["encoder_s"] == 20.0
    assert t["reached"]["step"] == 10 and abs(t["ratio"] - 0.1) < 1e-12  # 2.0 s of 20.0 s
    assert t["reached"]["setup_s"] == 0.2
    assert time_to_target(decoder[:2], encoder)["reached"] is None  # +0.07 < 0.08: not reached
    worse = _curve((0, 0.5, 0.40), (10, 20.0, 0.39))
    assert time_to_target(decoder, worse)["ratio"] is None  # no gain to reach a share of
