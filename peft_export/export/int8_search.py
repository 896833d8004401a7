"""The int8 recipe with margin: start from the default recipe (GPTQ-rounded weights, ``gptq.py``) and,
while the masks' agreement with fp32 is below the margin, return the next most sensitive weight
MatMul to fp32.

The gate (``verify.THRESHOLDS["int8"]``: prompt mask IoU mean >= 0.99, min >= 0.97 over 32 probe
prompts) stays where it is; the search aims higher (``MARGIN``) so that a graph that passes does not
sit at the gate's edge, where noise (another machine, another seed) flips it. Everything here runs
on the tuning images and prompts (``int8_data``), never on the gate's: the margin the search reaches
is the tuning data's, the gate then measures on data the recipe never saw.

Sensitivity (model-agnostic: no layer names): one fp32 run of the encoder on a tuning image records
the input of every weight MatMul; each layer's relative output error under the quantisation the
recipe applies (activations uint8 per tensor as dynamic quantisation does, weights int8/int7 per
channel) ranks it. One run and numpy, instead of one quantisation per layer (``benchmarks/
int8_variants.py --sensitivity`` measures the slow way, per block).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .quantize import Int8Recipe, batched_weight_matmuls, quantize_int8

MARGIN = {"prompt_mask_iou_mean": 0.993, "prompt_mask_iou_min": 0.975}
# The search may return at most a quarter of the weight MatMuls (and 16) to fp32 before it gives up
# (the gate then decides): beyond that the "int8" graph would be mostly fp32, a recipe that hides a
# broken quantisation (e.g. calibrated on the wrong images) instead of refusing it.
MAX_EXTRA_FP32 = 16
ROWS = 8192  # activation rows sampled per layer for its error


def matmul_sensitivity(src: str | os.PathLike, image: np.ndarray, recipe: Int8Recipe,
                       input_name: str = "image") -> list[tuple[str, float]]:
    """Weight MatMul nodes of ``src`` with the relative output error int8 gives each alone, worst first."""
    import onnx
    from onnx import numpy_helper

    from .gptq import matmul_input_probe, weight_matmul_nodes

    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    skip = set(batched_weight_matmuls(src)) | set(recipe.exclude)
    nodes = [n for n in weight_matmul_nodes(model) if n.name not in skip]
    arrays = {n.name: numpy_helper.to_array(weights[n.input[1]]).astype(np.float64) for n in nodes}  # before the probe
    with matmul_input_probe(model, nodes, src, input_name) as probe:  # moves the initialisers to its scratch file
        outs = probe(image)
    rng = np.random.default_rng(0)
    qmax = 63 if recipe.reduce_range else 127
    ranked = []
    for node in nodes:
        w = arrays[node.name]
        x = outs[node.input[0]].reshape(-1, w.shape[0]).astype(np.float64)
        if len(x) > ROWS:
            x = x[rng.choice(len(x), ROWS, replace=False)]
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)  # dynamic: uint8, range incl. 0
        scale = (hi - lo) / 255 or 1.0
        zero = np.round(-lo / scale)
        xq = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
        wmax = np.abs(w).max(axis=0 if recipe.per_channel else None, keepdims=recipe.per_channel)
        wscale = np.where(wmax > 0, wmax / qmax, 1.0)
        wq = np.clip(np.round(w / wscale), -qmax - 1, qmax) * wscale
        ref = x @ w
        ranked.append((node.name, float(np.linalg.norm(ref - xq @ wq) / max(np.linalg.norm(ref), 1e-30))))
    return sorted(ranked, key=lambda r: -r[1])


def below_margin(agreement: dict) -> bool:
    return (agreement["mask_iou_mean"] < MARGIN["prompt_mask_iou_mean"]
            or agreement["mask_iou_min"] < MARGIN["prompt_mask_iou_min"])


def search_int8_recipe(src: str | os.PathLike, dst: str | os.PathLike, recipe: Int8Recipe,
                       tuning: Sequence[np.ndarray], measure: Callable[[Path], dict],
                       calibration: Sequence[np.ndarray] | None = None,
                       log: Callable[[str], None] = lambda _m: None,
                       max_extra: int = MAX_EXTRA_FP32) -> tuple[Int8Recipe, dict]:
    """Quantise ``src`` to ``dst`` from ``recipe``, returning layers to fp32 (most sensitive first)
    while ``measure(dst)`` (prompt agreement on the tuning images: ``mask_iou_mean``, ``mask_iou_min``)
    is below ``MARGIN``. ``tuning``: GPTQ's images (the first also ranks the layers); ``calibration``:
    static QDQ ranges (None: dynamic). Returns the applied recipe and the search record for the manifest."""
    rounded = None
    if recipe.rounding == "gptq":  # once: the rounding of a layer does not depend on which others stay fp32
        from .gptq import gptq_weights

        rounded = gptq_weights(src, tuning)
    image = tuning[0]
    applied = quantize_int8(src, dst, recipe, calibration, rounded)
    agreement = measure(Path(dst))
    steps = [{"fp32_layers": len(recipe.exclude), "mask_iou_mean": agreement["mask_iou_mean"],
              "mask_iou_min": agreement["mask_iou_min"]}]
    ranked: list[tuple[str, float]] = []
    added: list[str] = []
    if below_margin(agreement):
        ranked = matmul_sensitivity(src, image, recipe)
    for name, error in ranked[:min(max_extra, max(1, (len(ranked) + len(recipe.exclude)) // 4))]:
        if not below_margin(agreement):
            break
        added.append(name)
        applied = quantize_int8(src, dst, replace(recipe, exclude=tuple(recipe.exclude) + tuple(added)), calibration,
                                rounded)
        agreement = measure(Path(dst))
        steps.append({"fp32_layers": len(applied.exclude), "added": name, "relative_error": round(error, 5),
                      "mask_iou_mean": agreement["mask_iou_mean"], "mask_iou_min": agreement["mask_iou_min"]})
        log(f"    int8 search: {name} back to fp32 -> IoU mean {agreement['mask_iou_mean']:.4f}, "
            f"min {agreement['mask_iou_min']:.4f}")
    weight_matmuls = matmul_weight_count(src)
    kept = [n for n in weight_matmuls if n in set(applied.exclude)]
    # The speed cost, counted: weight MatMuls left in fp32 of all that int8 could take.
    record = {"margin": dict(MARGIN), "measured_on": "the tuning images and prompts (int8_data), not the gate's",
              "reached": not below_margin(agreement), "fp32_by_search": added,
              "fp32_layers": list(applied.exclude), "weight_matmuls": len(weight_matmuls),
              "fp32_matmuls": len(kept), "int8_matmuls": len(weight_matmuls) - len(kept), "steps": steps}
    return applied, record


def matmul_weight_count(src: str | os.PathLike) -> list[str]:
    from .quantize import matmul_nodes

    skip = set(batched_weight_matmuls(src))
    return [n for n in matmul_nodes(src) if n not in skip]
