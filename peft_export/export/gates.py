"""The parity gate shared by every graph's check: the limits (``THRESHOLDS``), the verdict
(``judge``), the measures (``mask_iou``, ``cosine``, ``nonfinite``) and how a graph file is run on
a CPU backend (``graph_runner``). Its own module so that ``verify`` and the decoder modules it calls
(``click_decoder``, ``split_decoder``, ``ais``) import it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import PeftExportError
from ..runtime.manifest import BF16_VERIFIED_ON

# fp32 must be exact up to float rounding; reduced precisions report what they reach and
# fail below a floor that still keeps the masks usable.
THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"embeddings_max_rel": 1e-4, "mask_logits_max_rel": 1e-4, "mask_iou": 0.999,
             # AIS maps (sigmoid, 0..1): InstanceNorm over near-constant channels amplifies float
             # reordering at single pixels (tiny model: max 4e-4 ONNX Runtime, 2e-3 OpenVINO; mean 2e-6, 4e-6)
             "maps_max_abs": 5e-3, "maps_mean_abs": 1e-4},
    "fp16": {"embeddings_cosine": 0.99, "mask_iou": 0.95, "maps_mean_abs": 0.01},
    "int8": {"embeddings_cosine": 0.99, "mask_iou": 0.95,
             # per-prompt agreement with the fp32 masks (agreement.GATES): mean and worst prompt, on the
             # probe image and (with --calibration-data) on the user's images held out from tuning (int8_data)
             "prompt_mask_iou_mean": 0.99, "prompt_mask_iou_min": 0.97,
             "held_out_prompt_mask_iou_mean": 0.99, "held_out_prompt_mask_iou_min": 0.97},
    # OpenVINO's bf16 execution of the fp32 graphs (no file of its own): the int8 encoder's gate, the
    # fp16 AIS decoder's limit, and its map pixels on the same side of 0.5 (the post-processing's thresholds)
    # at 98 % (random-weight decoders, whose maps sit near 0.5: 0.988 at 128 px, 0.991 at 512)
    "bf16": {"embeddings_cosine": 0.99, "mask_iou": 0.95, "prompt_mask_iou_mean": 0.99, "prompt_mask_iou_min": 0.97,
             "maps_mean_abs": 0.01, "maps_threshold_agreement": 0.98},
}

# Where a bf16 graph is verified and what it runs on: OpenVINO with bf16 inference precision.
BF16_VERIFY_BACKEND = BF16_VERIFIED_ON
BF16_NOTE = ("the fp32 graph, run by OpenVINO with bf16 inference precision on CPUs with native bfloat16 "
             "(AVX512_BF16 or AMX): --backend openvino --precision bf16")


def ort_session(path: str | os.PathLike, providers: list[str] | None = None):
    """A CPU session with the runtime's options (``session_options``: the shared arena)."""
    import onnxruntime as ort

    from ..runtime.backends.ort import session_options

    opts = session_options("cpu")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def verify_backends(precision: str = "fp32") -> list[str]:
    """The CPU backends a graph of ``precision`` is verified on: ONNX Runtime, and OpenVINO when it is
    installed; bf16 (OpenVINO's bf16 mode, the only place it runs): that alone."""
    import importlib.util

    if precision == "bf16":
        return [BF16_VERIFY_BACKEND]
    return ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") is not None else [])


def bf16_mode_backends(precision: str) -> list[str]:
    """Where a graph of ``precision`` is also verified, optionally, in OpenVINO's bf16 mode: int8 graphs (their
    int8 layers as they are, the rest in bf16), on a CPU with native bfloat16 and OpenVINO installed. Passed,
    ``verified_on`` names it and the runtime's openvino backend runs the graph that way on such CPUs; failed,
    the graph stays verified on the others and runs in f32 mode (``parity_by_backend`` keeps the result)."""
    import importlib.util

    if precision != "int8" or importlib.util.find_spec("openvino") is None:
        return []
    from ..runtime.backends.ov import native_bf16

    return [] if native_bf16() else [BF16_VERIFY_BACKEND]


def check_bf16_export(precisions) -> None:
    """Refuse ``--precision bf16`` before any work where it cannot be verified, or without the fp32 graphs it runs."""
    if "bf16" not in precisions:
        return
    if "fp32" not in precisions:
        raise PeftExportError("--precision bf16: bf16 runs the fp32 graphs (OpenVINO's bf16 mode); add fp32")
    from ..runtime.backends.ov import native_bf16

    why = native_bf16()
    if why:
        raise PeftExportError(f"--precision bf16: cannot be verified on this machine: {why}")


def graph_runner(path: str | os.PathLike, backend: str = "onnxruntime"):
    """``run(feeds) -> {output name: array}`` for one graph file on a CPU backend, as the runtime runs it."""
    if backend == "onnxruntime":
        sess = ort_session(path)
        names = [o.name for o in sess.get_outputs()]
        return lambda feeds: dict(zip(names, sess.run(names, feeds)))
    if backend in ("openvino", BF16_VERIFY_BACKEND):
        from ..runtime.backends.ov import OpenVinoBackend

        ov = OpenVinoBackend({"graph": Path(path)}, "cpu", bf16_graphs=["graph"] if backend == BF16_VERIFY_BACKEND else ())
        return lambda feeds: ov.run("graph", feeds)
    raise PeftExportError(f"verify: unknown backend {backend!r} (use onnxruntime or openvino)")


def mask_iou(ref: list[torch.Tensor], cand: list[torch.Tensor]) -> float:
    inter = union = 0
    for a, b in zip(ref, cand):
        ma, mb = a > 0, b > 0
        inter += int((ma & mb).sum())
        union += int((ma | mb).sum())
    return 1.0 if union == 0 else inter / union


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def judge(stats: dict, precision: str, keys: tuple[str, ...]) -> dict:
    limits = {k: v for k, v in THRESHOLDS[precision].items() if k in keys}
    failed = []
    for key, limit in limits.items():
        value = stats[key]
        upper = key.endswith(("max_rel", "max_abs", "mean_abs"))  # errors: at most the limit; scores: at least
        bad = not np.isfinite(value) or (value > limit if upper else value < limit)
        if bad:
            failed.append(f"{key} {value:.6g} (limit {limit:g})")
    stats["thresholds"] = limits
    stats["passed"] = not failed and stats.get("finite", True)
    if not stats.get("finite", True):
        failed.append("NaN/Inf in outputs")
    stats["failures"] = failed
    return stats


def nonfinite(*arrays: np.ndarray) -> bool:
    return any(not np.isfinite(a).all() for a in arrays)
