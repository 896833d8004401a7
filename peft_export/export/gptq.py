"""GPTQ rounding for the int8 encoder: each weight MatMul's int8 values are chosen to keep the layer's
output close to fp32 on real activations, instead of rounding every weight to its nearest step.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022): quantise the input rows of a weight W (K x N, ``x @ W``) one at a time and
spread each row's rounding error over the rows not yet quantised, weighted by the inverse of the
layer's input Hessian H = XᵀX. The grid stays ONNX Runtime's (per output channel, symmetric,
7-bit: q in [-64, 64], scale = max|w| / 64), so the graph, its kernels and their exactness on CPUs
without VNNI are unchanged; only which grid value each weight takes changes. The fp32 activations
come from images that are not the gate's probe image, so the gate still measures unseen input.

Why: on a random vit_b, int8 costs each layer ~1.4 % relative output error, ~1.1 % from the run-time
activation quantisation and ~0.8 % from rounding the weights; GPTQ brings the weights' part to
~0.25 % (``benchmarks/int8_margin.py`` measures the masks).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

QMAX = 64  # ONNX Runtime's symmetric 7-bit (reduce_range) int8 grid: [-64, 64]
BLOCK = 128  # rows quantised before the rest are updated in one matrix product (the result is the same)
DAMP = 0.01  # fraction of the mean diagonal added to H: a dead or collinear input cannot make it singular


def weight_matmul_nodes(model) -> list:
    """The MatMul nodes of an ONNX model whose second input is a stored 2-D weight."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and ranks.get(n.input[1]) == 2]


@contextmanager
def matmul_input_probe(model, nodes: Sequence, src: str | os.PathLike,
                       input_name: str = "image") -> Iterator[Callable[[np.ndarray], dict]]:
    """``model`` (loaded from ``src``) run with every node's first input as an extra output: yields
    ``probe(image) -> {output name: array}``. Saving moves the initialisers to a scratch file next to
    ``src``: read the weights of ``model`` before entering."""
    import onnx

    from .gates import graph_runner

    known = {o.name for o in model.graph.output}
    for name in dict.fromkeys(n.input[0] for n in nodes):
        if name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(prefix=".probe.", dir=Path(src).resolve().parent) as scratch:
        path = Path(scratch) / "probe.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="probe.onnx.data")
        run = graph_runner(path)
        yield lambda image: run({input_name: np.ascontiguousarray(image, np.float32)})


def layer_hessians(src: str | os.PathLike, images: Sequence[np.ndarray],
                   input_name: str = "image") -> dict[str, np.ndarray]:
    """H = Σ XᵀX (float64) of every weight MatMul's input over ``images``, keyed by the weight's name."""
    import onnx

    model = onnx.load(str(src))
    nodes = weight_matmul_nodes(model)
    hessians: dict[str, np.ndarray] = {}
    with matmul_input_probe(model, nodes, src, input_name) as probe:
        for image in images:
            outs = probe(image)
            for node in nodes:
                x = outs[node.input[0]]
                x = x.reshape(-1, x.shape[-1])
                h = (x.T @ x).astype(np.float64)  # float32 product (fast), summed over images in float64
                hessians[node.input[1]] = hessians[node.input[1]] + h if node.input[1] in hessians else h
            del outs
    return hessians


def gptq_round(w: np.ndarray, hessian: np.ndarray, qmax: int = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and per-output-channel scales of ``w`` (K x N) on the symmetric grid [-qmax, qmax]."""
    w = np.asarray(w, np.float64)
    k = w.shape[0]
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    h = hessian + DAMP * max(float(np.mean(np.diag(hessian))), 1e-12) * np.eye(k)
    # Upper Cholesky factor of H⁻¹: row i holds how row i's error is spread over rows i+1.. (GPTQ, Alg. 1)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    work = w.copy()
    q = np.zeros(w.shape, np.int8)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        errors = np.zeros((i2 - i1, w.shape[1]))
        for i in range(i1, i2):
            qi = np.clip(np.round(work[i] / scale), -qmax, qmax)
            q[i] = qi
            err = (work[i] - qi * scale) / hinv[i, i]
            work[i + 1:i2] -= np.outer(hinv[i, i + 1:i2], err)
            errors[i - i1] = err
        work[i2:] -= hinv[i1:i2, i2:].T @ errors
    return q, scale.astype(np.float32)


def gptq_weights(src: str | os.PathLike, images: Sequence[np.ndarray],
                 input_name: str = "image") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GPTQ-rounded (int8 values, scales) of every weight MatMul of the fp32 graph ``src``."""
    import onnx
    from onnx import numpy_helper

    hessians = layer_hessians(src, images, input_name)
    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    return {name: gptq_round(numpy_helper.to_array(weights[name]), h) for name, h in hessians.items()}


def apply_gptq(dst: str | os.PathLike, rounded: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Overwrite the int8 weights of ONNX Runtime's quantised graph ``dst`` with ``rounded``.

    Only weights that ONNX Runtime quantised on the same grid (symmetric, 7-bit, per output channel:
    ``<w>_quantized``, ``<w>_scale``, zero point 0) are replaced; the rest (fp32 layers, other grids)
    stay as they are. Returns how many weight matrices now hold other values than ONNX Runtime's."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(dst))
    inits = {t.name: t for t in model.graph.initializer}
    replaced = 0
    for name, (q, scale) in rounded.items():
        qt, st, zt = (inits.get(f"{name}_{s}") for s in ("quantized", "scale", "zero_point"))
        if qt is None or st is None or zt is None:
            continue
        old_q, old_s, zero = (numpy_helper.to_array(t) for t in (qt, st, zt))
        if (old_q.dtype != np.int8 or old_q.shape != q.shape or old_s.shape != scale.shape or np.any(zero != 0)
                or int(np.abs(old_q).max()) > QMAX or not np.allclose(old_s, scale, rtol=1e-5)):
            continue  # another grid than the one GPTQ rounded for
        if np.array_equal(old_q, q):
            continue
        qt.CopyFrom(numpy_helper.from_array(q, qt.name))
        replaced += 1
    external = any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
                   for t in model.graph.initializer)
    tmp = Path(dst).with_name(Path(dst).name + ".gptq")
    if external:
        onnx.save(model, str(tmp), save_as_external_data=True, location=Path(dst).name + ".data")
    else:
        onnx.save(model, str(tmp))
    os.replace(tmp, dst)
    return replaced
