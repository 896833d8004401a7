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


@pytest.mark.slow  # one tiny export (CLI), twice: kept and --strict
def test_an_engine_that_fails_to_build_is_refused_and_the_onnx_graphs_are_kept(tmp_path, monkeypatch):
    """TensorRT cannot run here: the target and the engine builder are stand-ins (the only ones in this
    file). The builder fails as TensorRT does: pybind's RuntimeError for the encoder, and for
    decoder_lowres the error ``build_engine`` raises when ``build_serialized_network`` returns None."""
    import json

    import numpy as np
    from typer.testing import CliRunner

    from peft_export.cli.main import app
    from peft_export.export import tensorrt as trt_export
    from peft_export.export.refusals import EXIT_REFUSED
    from peft_export.export.verify import graph_runner
    from peft_export.merge import probe_inputs
    from peft_export.peft.adapters import save_adapter

    target = trt_export.TrtTarget(None, "10.3.0", 10, "NVIDIA H100 80GB HBM3", (9, 0))
    built = []

    def failing_builder(target, onnx_path, engine_path, graph, precision, image_size, cache_path):
        built.append((graph, precision, onnx_path.is_file()))
        if graph == "encoder":
            raise RuntimeError("[TRT] Error Code 2: Internal Error (Assertion failed: out of memory)")
        raise PeftExportError(f"{onnx_path.name}: TensorRT failed to build a {precision} engine")

    monkeypatch.setattr(trt_export, "check_tensorrt", lambda precisions: target)
    monkeypatch.setattr(trt_export, "build_engine", failing_builder)
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128)
    save_adapter(adapted, tmp_path / "run")
    out = tmp_path / "exp"
    args = ["merge-and-export", "--adapter", str(tmp_path / "run"), "--format", "onnx,tensorrt",
            "--precision", "fp32", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == EXIT_REFUSED == 3, res.output
    # each engine was tried, from its ONNX graph on disk
    assert built == [("encoder", "fp32", True), ("decoder_lowres", "fp32", True)]
    assert res.output.count("refused: encoder engine fp32 (build failed: [TRT] Error Code 2") == 1, res.output
    assert res.output.count("refused: decoder_lowres engine fp32 (build failed: decoder_lowres.onnx: TensorRT "
                            "failed to build a fp32 engine)") == 1, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(r["graph"], r["precision"], r["backend"]) for r in manifest["refused"]] == [
        ("encoder engine", "fp32", "tensorrt"), ("decoder_lowres engine", "fp32", "tensorrt")]
    assert manifest["tensorrt"]["engines"] == {} and manifest["tensorrt"]["timing_cache"] is None
    assert not list(out.glob("*.engine")) and not (out / trt_export.TIMING_CACHE).exists()
    # what passed is written and is the real thing: the fp32 encoder computes what the torch model does;
    # decoder_lowres (the decoder engine's source) comes with --format tensorrt, Meta's decoder does not
    assert {"encoder", "decoder_lowres", "split_image", "split_prompts", "split_masks"} <= set(manifest["graphs"])
    assert "decoder" not in manifest["graphs"] and not (out / "decoder.onnx").exists()
    for graph in ("encoder", "decoder_lowres"):
        assert (out / manifest["graphs"][graph]["fp32"]["path"]).is_file()
    image, _ = probe_inputs(128)
    with torch.no_grad():
        ref = adapted.model.image_encoder(image).numpy()
    got = graph_runner(out / "encoder.onnx")({"image": image.numpy()})["image_embeddings"]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    # --strict: all or nothing
    res = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "strict"), "--strict"])
    assert res.exit_code == 2 and "TensorRT" in res.output and "--strict" in res.output, res.output
    assert not (tmp_path / "strict").exists()


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_GPU, reason="TensorRT engines need a CUDA GPU")
@pytest.mark.skipif(not HAVE_TRT, reason="tensorrt is not importable (not installable on these machines)")
def test_tensorrt_engines_match_onnxruntime(tmp_path):
    import tensorrt as trt

    adapted = make_adapted(MERGEABLE_CONFIGS["lora"])
    with torch.no_grad():  # a random tiny decoder gives near-empty masks: scale its mask heads so they are not
        for mlp in adapted.model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
            mlp.layers[-1].bias.mul_(30.0)
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
            # the engine's outputs against ONNX Runtime's, recomputed here (not the manifest's own verdict)
            _engine_matches_onnxruntime(out / entry["path"], out / entry["onnx"], graph, precision)
    assert not manifest["refused"]
    _runtime_backend_matches_onnxruntime(out)


def _engine_matches_onnxruntime(engine, onnx_path, graph: str, precision: str) -> None:
    import numpy as np

    from peft_export.export.tensorrt import TRT_THRESHOLDS, check_tensorrt, run_engine
    from peft_export.export.verify import ort_session

    rng = np.random.default_rng(1)
    sess = ort_session(onnx_path)
    feeds = {}
    for inp in sess.get_inputs():  # the profile's smallest shapes; embeddings/images random, one box prompt
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        if inp.name == "point_coords":
            feeds[inp.name] = np.asarray([[[30, 40], [150, 160]]], np.float32)
        elif inp.name == "point_labels":
            feeds[inp.name] = np.asarray([[2, 3]], np.float32)
        elif inp.name in ("has_mask_input", "mask_input"):
            feeds[inp.name] = np.zeros(shape, np.float32)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    got = run_engine(check_tensorrt((precision,)), engine, feeds)
    limits = TRT_THRESHOLDS[precision]
    for name, ref in want.items():
        a, b = ref.astype(np.float64).ravel(), got[name].astype(np.float64).ravel()
        assert np.isfinite(b).all(), (graph, precision, name)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= limits["cosine"], (graph, precision, name)
        if name == "low_res_masks":
            union = np.logical_or(ref > 0, got[name] > 0).sum()
            assert union > 0, "empty masks prove nothing"
            assert np.logical_and(ref > 0, got[name] > 0).sum() / union >= limits["mask_iou"], (graph, precision)


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
    # every box's mask is non-empty on both backends (scaled mask heads), so the IoU below means something
    assert (low_o > 0).reshape(70, -1).any(axis=1).all() and (low_t > 0).reshape(70, -1).any(axis=1).all()
    inter = np.logical_and(low_t > 0, low_o > 0).sum()
    union = np.logical_or(low_t > 0, low_o > 0).sum()
    assert inter / union > 0.99
    np.testing.assert_allclose(iou_t, iou_o, atol=1e-2)
    points = rng.uniform(0, 200, size=(1, 17, 2)).astype(np.float32)
    with pytest.raises(PeftExportError, match="points per prompt.*1 to 16"):
        trt_session.predict_batch(points=points, point_labels=np.ones((1, 17), np.float32))
