"""The TensorRT backend's shape planning, without TensorRT: the profiles the builder gives the engines,
prompt batches beyond them run in chunks (checked on the real decoder graph in ONNX Runtime), points
beyond them refused with a message that says what the engine takes. The engines themselves need
tensorrt and a GPU (tests/test_export_tensorrt.py, benchmarks/gpu_check.sh)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.errors import PeftExportError
from peft_export.export import onnx_graphs as og
from peft_export.export.tensorrt import BATCH, NUM_POINTS, _profile_shapes
from peft_export.runtime.backends.trt import batched_inputs, check_status, plan_chunks, run_in_chunks

SIZE = 128
G = SIZE // 16


def _decoder_feeds(batch: int, points: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image_embeddings": rng.normal(size=(1, 256, G, G)).astype(np.float32),
        "point_coords": rng.uniform(0, SIZE, size=(batch, points, 2)).astype(np.float32),
        "point_labels": rng.integers(0, 2, size=(batch, points)).astype(np.float32),
        "mask_input": rng.normal(size=(batch, 1, 4 * G, 4 * G)).astype(np.float32),
        "has_mask_input": (rng.uniform(size=batch) > 0.5).astype(np.float32),
    }


def _shapes(feeds):
    return {k: v.shape for k, v in feeds.items()}


PROFILE = _profile_shapes("decoder_lowres", SIZE)  # what build_engine gives the decoder engine


def test_prompts_within_the_profile_run_at_once():
    assert sorted(batched_inputs(PROFILE)) == ["has_mask_input", "mask_input", "point_coords", "point_labels"]
    assert plan_chunks("decoder_lowres", _shapes(_decoder_feeds(8, 3)), PROFILE) == [(0, 8)]
    assert plan_chunks("decoder_lowres", _shapes(_decoder_feeds(BATCH[2], NUM_POINTS[2])), PROFILE) == [(0, BATCH[2])]


def test_more_prompts_than_the_profile_run_in_chunks_of_its_maximum():
    chunks = plan_chunks("decoder_lowres", _shapes(_decoder_feeds(2 * BATCH[2] + 3, 2)), PROFILE)
    assert chunks == [(0, 64), (64, 128), (128, 131)]


def test_more_points_than_the_profile_are_refused_with_what_the_engine_takes():
    with pytest.raises(PeftExportError, match=r"17 points per prompt.*built for 1 to 16.*onnxruntime"):
        plan_chunks("decoder_lowres", _shapes(_decoder_feeds(2, NUM_POINTS[2] + 1)), PROFILE)


def test_other_shapes_outside_the_profile_are_refused_by_name():
    feeds = _decoder_feeds(2, 3)
    feeds["image_embeddings"] = np.zeros((1, 256, G + 1, G + 1), np.float32)
    with pytest.raises(PeftExportError, match=r"input image_embeddings is 9 along axis 2; .* takes 8 to 8"):
        plan_chunks("decoder_lowres", _shapes(feeds), PROFILE)
    feeds = _decoder_feeds(2, 3)
    feeds["mask_input"] = feeds["mask_input"][:1]
    with pytest.raises(PeftExportError, match="disagree on the prompt batch size"):
        plan_chunks("decoder_lowres", _shapes(feeds), PROFILE)
    feeds = _decoder_feeds(2, 3)
    del feeds["has_mask_input"]
    with pytest.raises(PeftExportError, match="input has_mask_input is missing"):
        plan_chunks("decoder_lowres", _shapes(feeds), PROFILE)
    encoder = _profile_shapes("encoder", SIZE)
    with pytest.raises(PeftExportError, match="built for 128"):
        plan_chunks("encoder", {"image": (1, 3, 256, 256)}, encoder)
    assert plan_chunks("encoder", {"image": (1, 3, SIZE, SIZE)}, encoder) == [(0, 1)]


def test_chunked_run_equals_one_run_on_the_real_decoder_graph(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the chunking check runs the decoder graph in onnxruntime")
    model = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=SIZE).model
    og.export_decoder_onnx(model, tmp_path / "decoder_lowres.onnx", "decoder_lowres")
    sess = ort.InferenceSession(str(tmp_path / "decoder_lowres.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    calls = []

    def run_once(feeds):
        calls.append(len(feeds["point_coords"]))
        return dict(zip(names, sess.run(None, feeds)))

    # A profile with a small maximum batch, so 10 prompts take 4 runs.
    small = {k: ((1,) + lo[1:], (2,) + opt[1:], (3,) + hi[1:]) if k in batched_inputs(PROFILE) else (lo, opt, hi)
             for k, (lo, opt, hi) in PROFILE.items()}
    feeds = _decoder_feeds(10, 4, seed=1)
    chunks = plan_chunks("decoder_lowres", _shapes(feeds), small)
    chunked = run_in_chunks(run_once, feeds, batched_inputs(small), chunks)
    assert calls == [3, 3, 3, 1]
    whole = dict(zip(names, sess.run(None, feeds)))
    for name in names:
        assert chunked[name].shape == whole[name].shape
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-5)
    assert np.abs(whole["low_res_masks"]).max() > 0


def test_failed_tensorrt_calls_raise_instead_of_passing_silently():
    for failed in (None, False):
        with pytest.raises(PeftExportError, match="TensorRT: set_input_shape failed"):
            check_status(failed, "set_input_shape")
    check_status(True, "ok")
    check_status(object(), "an object TensorRT returned")
