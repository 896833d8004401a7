"""Reduced precisions of an exported graph.

* fp16: exported from torch (``onnx_graphs.Fp16EncoderGraph``): fp16 weights and compute,
  LayerNorms kept in fp32 (their variance overflows in fp16), graph input/output fp32, so
  the runtime feeds and reads float32 whatever the precision. ONNX Runtime's CPU provider
  runs the ops it has no fp16 kernel for in fp32 (it inserts the casts itself).
* int8: ONNX Runtime's quantisation tools, with one of two recipes (``Int8Recipe``):

  - dynamic (no calibration data): weights QInt8, activations quantised at run time.
    Weights use 7 bits (``reduce_range``): full 8-bit signed weights saturate ONNX Runtime's
    u8s8 kernels on x86 CPUs without VNNI (AVX2 only, e.g. AMD EPYC): there the tiny model's
    embedding cosine fell to 0.985 and mask IoU to 0.91, against 0.9996 / 0.99 with 7-bit
    weights. An export is verified on one machine and deployed on others, so the graph must
    be right on both kinds. Per-channel weight scales and MatMul-only quantisation (the
    patch-embedding and neck convolutions stay fp32) are the defaults because they keep the
    masks closest to fp32 (``benchmarks/int8_variants.py`` measures every variant).
  - static QDQ (``calibration`` images given): activation ranges calibrated (MinMax) on the
    user's own images through the fp32 graph; QuantizeLinear/DequantizeLinear pairs that both
    ONNX Runtime and OpenVINO fuse into int8 kernels.

  ``exclude`` leaves named nodes in fp32 (the sensitive ones: ``sensitive_nodes``).
  ``rounding="gptq"`` (the default recipe's) keeps ONNX Runtime's grid and kernels but picks each
  weight's int8 value to keep the layer's output on real activations (``gptq.py``).
  Whatever the recipe, merge-and-export refuses an int8 graph whose masks differ from the
  fp32 model's (``gates.THRESHOLDS``) and leaves it out (``refusals.py``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8", "bf16")  # bf16: the fp32 graphs in OpenVINO's bf16 mode (gates)
EXTERNAL_DATA_BYTES = 1_500_000_000  # above this the int8 graph also uses external data


@dataclass(frozen=True)
class Int8Recipe:
    """How an fp32 graph is quantised to int8 (recorded in the manifest)."""

    per_channel: bool = True
    op_types: tuple[str, ...] = ("MatMul",)  # () = every type ONNX Runtime can quantise
    reduce_range: bool = True  # 7-bit weights: exact on CPUs without VNNI too (see the module doc)
    exclude: tuple[str, ...] = ()  # node names kept in fp32
    static: bool = False  # True: QDQ with activation ranges calibrated on images
    calibration_images: int = 0
    only: tuple[str, ...] = ()  # node names quantised (empty: every node of op_types not excluded)
    # "nearest": each weight to its nearest int8 step (ONNX Runtime's own); "gptq": the same grid, values
    # chosen to keep each layer's output on real activations (gptq.py; needs images, not the probe's)
    rounding: str = "nearest"
    # filled in by quantize_int8: weight matrices whose int8 values GPTQ changed (None: GPTQ not run). A
    # "gptq" recipe that changed none is recorded as "nearest": that is what the graph holds.
    gptq_changed: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["op_types"] = list(self.op_types) or "all"
        d["exclude"] = list(self.exclude)
        d["only"] = list(self.only)
        d["mode"] = "static QDQ, calibrated" if self.static else "dynamic"
        return d


DEFAULT_INT8 = Int8Recipe()


def onnx_bytes(path: str | os.PathLike) -> int:
    """Size of a graph with its external data file."""
    path = Path(path)
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


@contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice and shape-inference notes at WARNING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


@contextmanager
def _calibration_in_priority_order() -> Iterator[None]:
    """ONNX Runtime's calibrator runs its augmented graph (a ReduceMin/ReduceMax after every calibrated
    tensor, appended at the graph's end) in the default order, which runs the reductions last: every
    calibrated tensor stays alive to the end of the run. In priority order each reduction runs right
    after its tensor: vit_b at 1024 px calibrates on 16 images in 5.7 GB of process peak instead of
    13.4 GB for one image and a second one killed for memory on 24 GB
    (``benchmarks/bench_calibration_memory.py``). The calibrator takes no session options, so its
    session factory is swapped while a quantisation runs."""
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate

    base = calibrate.CalibraterBase
    original = base.create_inference_session

    def create_inference_session(self) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ONNX Runtime's own
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=options,
                                                  providers=getattr(self, "execution_providers", None)
                                                  or ["CPUExecutionProvider"])

    base.create_inference_session = create_inference_session
    try:
        yield
    finally:
        base.create_inference_session = original


class _Images:
    """ONNX Runtime CalibrationDataReader over preprocessed encoder inputs (1,3,S,S)."""

    def __init__(self, inputs: Sequence[np.ndarray], input_name: str = "image") -> None:
        self._it = iter(list(inputs))
        self._name = input_name

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {self._name: np.ascontiguousarray(x, np.float32)}

    def rewind(self) -> None:  # not needed by MinMax; part of the reader interface
        pass


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    recipe: Int8Recipe = DEFAULT_INT8,
    calibration: Sequence[np.ndarray] | None = None,
    rounded: dict | None = None,
) -> Int8Recipe:
    """Quantise ``src`` to ``dst`` with ``recipe``; static QDQ when ``calibration`` inputs are given.

    ``recipe.rounding == "gptq"`` rounds the weights with ``rounded`` (``gptq.gptq_weights``; computed
    here from the calibration inputs when not given). Returns the recipe that was applied (``static``,
    ``calibration_images`` and ``gptq_changed`` filled in; ``rounding`` is "gptq" only when GPTQ
    changed some weight's value).
    """
    if recipe.rounding not in ("nearest", "gptq"):
        raise ValueError(f"int8 rounding {recipe.rounding!r}: use 'nearest' or 'gptq'")
    if recipe.rounding == "gptq" and rounded is None and (calibration is None or not len(calibration)):
        raise ValueError("int8 rounding 'gptq' needs images: pass calibration inputs or rounded weights")
    applied = _quantize_int8(src, dst, recipe, calibration)
    if recipe.rounding == "gptq":
        from .gptq import apply_gptq, gptq_weights

        changed = apply_gptq(dst, rounded if rounded is not None else gptq_weights(src, calibration))
        applied = replace(applied, gptq_changed=changed, rounding="gptq" if changed else "nearest")
    return applied


def _quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, recipe: Int8Recipe,
                   calibration: Sequence[np.ndarray] | None) -> Int8Recipe:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    # absolute: the calibrator below runs in a scratch folder of its own (os.chdir)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    external = onnx_bytes(src) // 4 > EXTERNAL_DATA_BYTES
    exclude = list(recipe.exclude) + [n for n in batched_weight_matmuls(src) if n not in recipe.exclude]
    if calibration is not None and len(calibration):
        # attention's activation x activation products stay fp32, as quantize_dynamic leaves them: ONNX
        # Runtime's "MatMulConstBOnly" is not honoured in QDQ format (1.32 quantised them), and QDQ pairs
        # there also break OpenVINO's fused attention (hiera_t 1024: 1320 ms against 855 in bf16 mode)
        exclude += [n for n in activation_matmuls(src) if n not in exclude]
    common = dict(per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                  op_types_to_quantize=list(recipe.op_types) or None,
                  nodes_to_exclude=exclude or None, nodes_to_quantize=list(recipe.only) or None,
                  use_external_data_format=external)
    with _quiet():
        if calibration is not None and len(calibration):
            applied = replace(recipe, static=True, calibration_images=len(calibration))
            # The calibrator writes an augmented copy of the model (a min and max after every tensor) next to it.
            with tempfile.TemporaryDirectory(prefix=".calib.", dir=dst.parent) as scratch:
                cwd = os.getcwd()
                os.chdir(scratch)
                try:
                    with _calibration_in_priority_order():
                        quantize_static(
                            str(src), str(dst), _Images(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **common,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           "MatMulConstBOnly": True})
                finally:
                    os.chdir(cwd)
            return applied
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, **common)
    return replace(recipe, static=False, calibration_images=0)


def batched_weight_matmuls(path: str | os.PathLike) -> list[str]:
    """MatMul nodes whose stored weight is not a matrix (e.g. per-head (H, d, C) blocks of the
    folded decoder attention). ONNX Runtime's quantizer converts them, but its integer MatMul
    kernels take only a 2-D weight and fail at run time; they stay fp32 (they are small)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and len(node.input) > 1 and ranks.get(node.input[1], 2) != 2]


def activation_matmuls(path: str | os.PathLike) -> list[str]:
    """MatMul nodes whose second input is not a stored weight (attention's q k^T and attn v)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] not in weights]


def matmul_nodes(path: str | os.PathLike, block: int | None = None, part: str | None = None) -> list[str]:
    """Names of the weight MatMul nodes (a Linear layer's: its second input is a stored weight) of an
    encoder graph, optionally of one block and/or one layer.

    ``part``: ``qkv``, ``proj``, ``lin1`` or ``lin2`` (the TorchScript exporter names nodes after
    the module path, e.g. ``/image_encoder/blocks.3/attn/qkv/MatMul``).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        if block is not None and f"/blocks.{block}/" not in node.name:
            continue
        if part is not None and f"/{part}/" not in node.name:
            continue
        names.append(node.name)
    return names


# Layers left in fp32 by default, found by measurement (benchmarks/int8_variants.py): quantising
# them alone costs the most mask agreement. Filled in per model type from that measurement.
SENSITIVE_PARTS: dict[str, tuple[tuple[int | None, str], ...]] = {}


# TinyViT (vit_t) names its nodes /image_encoder/layers.<stage>/blocks.<i>/..., so they are picked by
# path: the last stage's MLPs (fc1, fc2 of its 2 blocks). Measured on random vit_t (256 px, merged late
# LoRA): every weight MatMul in int8 gives prompt mask IoU mean 0.9868; these 4 in fp32 0.9945 (the
# whole last stage 0.9986; any other stage, or the attention alone, stays below the 0.99 gate).
SENSITIVE_PATHS: dict[str, tuple[str, ...]] = {"vit_t": ("/layers.3/blocks.0/mlp/", "/layers.3/blocks.1/mlp/")}


def sensitive_nodes(path: str | os.PathLike, model_type: str) -> tuple[str, ...]:
    """The node names of ``SENSITIVE_PARTS[model_type]`` (and ``SENSITIVE_PATHS``) in this graph."""
    names: list[str] = []
    for block, part in SENSITIVE_PARTS.get(model_type, ()):
        names += matmul_nodes(path, block, part)
    paths = SENSITIVE_PATHS.get(model_type, ())
    names += [n for n in matmul_nodes(path) if any(p in n for p in paths)] if paths else []
    return tuple(names)


def default_recipe(path: str | os.PathLike, model_type: str) -> Int8Recipe:
    return Int8Recipe(exclude=sensitive_nodes(path, model_type), rounding="gptq")

