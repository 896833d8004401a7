"""TensorRT engines (needs the tensorrt package and a CUDA GPU; skipped otherwise) and the
clear, early refusal where they are missing (runs everywhere)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.errors import PeftExportError
from peft_export.export import merge_and_export

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_GPU = torch.cuda.is_available()


@pytest.mark.skipif(HAVE_TRT and HAVE_GPU, reason="tensorrt and a GPU are present: the refusal path cannot run")
def test_tensorrt_missing_is_refused_before_any_work(tmp_path):
    adapted = make_adapted(MERGEABLE_CONFIGS["ssf"], image_size=128)
    with pytest.raises(PeftExportError, match="tensorrt|GPU"):
        merge_and_export(adapted, tmp_path / "exp", formats=("onnx", "tensorrt"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_int8_is_refused(tmp_path):
    from peft_export.export.tensorrt import check_tensorrt

    with pytest.raises(PeftExportError, match="int8"):
        check_tensorrt(("fp32", "int8"))


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_GPU, reason="TensorRT engines need a CUDA GPU")
@pytest.mark.skipif(not HAVE_TRT, reason="tensorrt is not importable (not installable on these machines)")
def test_tensorrt_engines_match_onnxruntime(tmp_path):
    import tensorrt as trt

    adapted = make_adapted(MERGEABLE_CONFIGS["lora"])
    out = tmp_path / "exp"
    manifest = merge_and_export(adapted, out, formats=("onnx", "tensorrt"), precisions=("fp32", "fp16"),
                                progress=False)
    section = manifest["tensorrt"]
    assert manifest["versions"]["tensorrt"] == trt.__version__
    assert (out / section["timing_cache"]).is_file()
    for graph in ("encoder", "decoder_lowres"):
        for precision, entry in section["engines"][graph].items():
            assert (out / entry["path"]).is_file()
            assert entry["path"].startswith(f"{graph}.{precision}.") and ".sm" in entry["path"]
            assert f".trt{'.'.join(trt.__version__.split('.')[:2])}.engine" in entry["path"]
            assert entry["parity_vs_onnxruntime"]["passed"]
    _runtime_backend_matches_onnxruntime(out)


def _runtime_backend_matches_onnxruntime(out) -> None:
    """SamSession on the engines: 70 boxes (beyond the profile's 64: two chunks) as ONNX Runtime gives
    them, and 17 points per prompt refused with what the engine takes."""
    import numpy as np

    from peft_export.runtime import SamSession

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(200, 256, 3), dtype=np.uint8)
    xy = rng.uniform(0, 150, size=(70, 2))
    boxes = np.concatenate([xy, xy + 40], axis=1).astype(np.float32)
    trt_session = SamSession(out, backend="tensorrt", device="cuda", precision="fp32")
    ort_session_ = SamSession(out, backend="onnxruntime", device="cpu", precision="fp32")
    trt_session.set_image(image)
    ort_session_.set_image(image)
    _, iou_t, low_t = trt_session.predict_batch(boxes=boxes)
    _, iou_o, low_o = ort_session_.predict_batch(boxes=boxes)
    assert low_t.shape == low_o.shape == (70,) + low_o.shape[1:]
    inter = np.logical_and(low_t > 0, low_o > 0).sum()
    union = np.logical_or(low_t > 0, low_o > 0).sum()
    assert union == 0 or inter / union > 0.99
    np.testing.assert_allclose(iou_t, iou_o, atol=1e-2)
    points = rng.uniform(0, 200, size=(1, 17, 2)).astype(np.float32)
    with pytest.raises(PeftExportError, match="points per prompt.*1 to 16"):
        trt_session.predict_batch(points=points, point_labels=np.ones((1, 17), np.float32))
