"""GPTQ rounding of the int8 encoder: ONNX Runtime's grid kept, each layer closer to fp32 on unseen input."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.export.gptq import QMAX, apply_gptq, gptq_round, gptq_weights, weight_matmul_nodes
from peft_export.export.quantize import Int8Recipe, quantize_int8
from peft_export.export.verify import graph_runner
from peft_export.merge import probe_inputs




def test_gptq_round_stays_on_the_grid_and_beats_nearest_on_unseen_inputs():
    rng = np.random.default_rng(3)
    k, n = 96, 40
    w = rng.normal(size=(k, n)) * rng.uniform(0.2, 2.0, size=n)  # per-channel scales differ
    # real layer inputs are correlated across channels: that is what GPTQ's Hessian exploits
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    seen, unseen = rng.normal(size=(2000, k)) @ mix, rng.normal(size=(2000, k)) @ mix  # same layer, other inputs
    q, scale = gptq_round(w, seen.T @ seen)
    assert q.dtype == np.int8 and int(np.abs(q).max()) <= QMAX
    np.testing.assert_allclose(scale, np.abs(w).max(0) / QMAX, rtol=1e-6)  # ONNX Runtime's 7-bit scale
    nearest = np.clip(np.round(w / scale), -QMAX, QMAX) * scale
    err = lambda wq: np.linalg.norm(unseen @ w - unseen @ wq) / np.linalg.norm(unseen @ w)  # noqa: E731
    assert err(q * scale) < 0.85 * err(nearest), (err(q * scale), err(nearest))


@pytest.mark.slow
def test_gptq_int8_graph_is_closer_to_fp32_than_nearest_rounding(tmp_path):
    from peft_export.export import onnx_graphs as og

    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128)
    src = tmp_path / "encoder.onnx"
    og.export_encoder_onnx(adapted.model.eval(), src, 17, "fp32", "torchscript", "plain")
    hessian_images = [probe_inputs(128, seed)[0].numpy() for seed in (1, 2)]
    rounded = gptq_weights(src, hessian_images)
    import onnx

    assert set(rounded) == {n.input[1] for n in weight_matmul_nodes(onnx.load(str(src)))}
    nearest, gptq = tmp_path / "nearest.onnx", tmp_path / "gptq.onnx"
    quantize_int8(src, nearest, Int8Recipe())
    quantize_int8(src, gptq, Int8Recipe(rounding="gptq"), rounded=rounded)
    # the same graph (ops, grid, scales), other int8 values
    a, b = onnx.load(str(nearest)), onnx.load(str(gptq))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    qa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer if t.name.endswith("_quantized")}
    qb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer if t.name.endswith("_quantized")}
    assert qa.keys() == qb.keys() and len(qa) == len(rounded)
    assert all(int(np.abs(v).max()) <= QMAX for v in qb.values())
    assert sum(int((qa[k] != qb[k]).sum()) for k in qa) > 0
    # closer to fp32 on an image GPTQ did not see (the gate's probe image)
    image = probe_inputs(128, 0)[0].numpy()
    ref = graph_runner(src)({"image": image})["image_embeddings"]
    out = {p: graph_runner(p)({"image": image})["image_embeddings"] for p in (nearest, gptq)}
    err = {p: float(np.linalg.norm(o - ref) / np.linalg.norm(ref)) for p, o in out.items()}
    assert err[gptq] < err[nearest], err


def test_apply_gptq_leaves_other_grids_alone(tmp_path):
    # an int8 graph quantised on another grid (8-bit weights) is not rewritten with 7-bit values
    import onnx
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w, "w")])
    src = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    x = np.random.default_rng(1).normal(size=(64, 8))
    rounded = {"w": gptq_round(w, x.T @ x)}
    seven, eight = tmp_path / "seven.onnx", tmp_path / "eight.onnx"
    quantize_int8(src, seven, Int8Recipe(rounding="gptq"), rounded=rounded)
    quantize_int8(src, eight, Int8Recipe(reduce_range=False))
    assert apply_gptq(eight, rounded) == 0
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(seven)).graph.initializer}
    np.testing.assert_array_equal(stored["w_quantized"], rounded["w"][0])


def test_gptq_is_recorded_only_when_it_changed_weights(tmp_path):
    # A "gptq" recipe whose rounding equals ONNX Runtime's nearest one writes the same graph: the
    # applied recipe says "nearest" (and how many matrices GPTQ changed), not "gptq".
    import onnx
    from onnx import helper, numpy_helper

    w = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w, "w")])
    src = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    nearest = quantize_int8(src, tmp_path / "nearest.onnx", Int8Recipe())
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "nearest.onnx")).graph.initializer}
    same = quantize_int8(src, tmp_path / "same.onnx", Int8Recipe(rounding="gptq"),
                         rounded={"w": (stored["w_quantized"], stored["w_scale"])})
    assert (nearest.rounding, nearest.gptq_changed) == ("nearest", None)
    assert (same.rounding, same.gptq_changed) == ("nearest", 0) and same.to_dict()["rounding"] == "nearest"
    x = np.random.default_rng(1).normal(size=(64, 8))
    moved = quantize_int8(src, tmp_path / "moved.onnx", Int8Recipe(rounding="gptq"), rounded={"w": gptq_round(w, x.T @ x)})
    assert (moved.rounding, moved.gptq_changed) == ("gptq", 1)


def test_gptq_recipe_without_images_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gptq"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx", Int8Recipe(rounding="gptq"))
