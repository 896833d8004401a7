"""merge-and-export: every graph/precision exports and passes parity; the manifest contract;
Meta's decoder against SamPredictor; batched low-res decoder (--meta-decoder); the default export
(the decoder family only) end to end; failures leave nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from typer.testing import CliRunner

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.peft.adapters import save_adapter
from peft_export.errors import PeftExportError
from peft_export.export import (
    export_decoder_onnx,
    merge_and_export,
    ort_session,
    read_manifest,
)
from peft_export.export import pipeline, verify
from peft_export.fsutil import sha256_file
from peft_export.peft import merge_peft

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

CONTRACT_IO = {
    "encoder": (["image"], ["image_embeddings"]),
    "decoder": (
        ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"],
        ["masks", "iou_predictions", "low_res_masks"],
    ),
    "decoder_lowres": (
        ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"],
        ["low_res_masks", "iou_predictions"],
    ),
    "split_image": (["image_embeddings"], ["image_keys", "layer0_k", "layer0_v", "layer0_q"]),
    "split_prompts": (  # the decoder family's prompt graph takes the mask input (predict's iterative loop)
        ["image_keys", "layer0_k", "layer0_v", "layer0_q", "point_coords", "point_labels", "mask_input",
         "has_mask_input"],
        ["iou_predictions", "mask_weights", "keys"],
    ),
    "split_masks": (["keys", "mask_weights"], ["low_res_masks"]),
    "click_decoder": (
        ["image_keys", "layer0_k", "layer0_v", "layer0_q", "point_coords", "point_labels", "mask_input",
         "has_mask_input"],
        ["low_res_masks", "iou_predictions", "mask_index"],
    ),
}


@pytest.fixture(scope="module")
def adapted_lora():
    return make_adapted(MERGEABLE_CONFIGS["lora"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, adapted_lora) -> tuple[Path, dict]:
    """One export shared by the module: all precisions, the preprocess-in-graph encoder and Meta's
    decoders (``meta_decoder``: decoder + decoder_lowres, off by default)."""
    adapted = adapted_lora
    out = tmp_path_factory.mktemp("export") / "sam_onnx"
    manifest = merge_and_export(adapted, out, precisions=("fp32", "fp16", "int8"), preprocess_in_graph=True,
                                progress=False, meta_decoder=True)
    return out, manifest


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_manifest_follows_the_contract(exported):
    out, manifest = exported
    assert manifest == read_manifest(out)
    assert manifest["format"] == "peftexport-export" and manifest["format_version"] == 1
    assert manifest["model_type"] == "tiny" and manifest["image_size"] == 256
    assert manifest["embedding_shape"] == [256, 16, 16] and manifest["low_res_size"] == 64
    assert manifest["merged"] is True and manifest["in_graph_adapters"] == []
    assert manifest["peft"]["method"] == "lora"
    pre = manifest["preprocessing"]
    assert pre["resize"] == "longest_side" and len(pre["pixel_mean"]) == 3 and pre["intensity"]["name"] == "percentile"
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "tensorrt"}
    assert manifest["versions"]["tensorrt"] is None and "tensorrt" not in manifest
    assert set(manifest["graphs"]["encoder"]) == {"fp32", "fp16", "int8"}
    assert set(manifest["graphs"]) == {"encoder", "encoder_preprocess", "decoder", "decoder_lowres",
                                       "split_image", "split_prompts", "split_masks", "click_decoder"}
    files_on_disk = {p.name for p in out.iterdir()}
    listed = {"manifest.json"}
    for graph, by_precision in manifest["graphs"].items():
        for precision, entry in by_precision.items():
            assert entry["sha256"] == sha256_file(out / entry["path"])
            for f in entry["files"]:
                assert f["sha256"] == sha256_file(out / f["path"])
                listed.add(f["path"])
            if graph in CONTRACT_IO:
                assert [t["name"] for t in entry["inputs"]] == CONTRACT_IO[graph][0]
                assert [t["name"] for t in entry["outputs"]] == CONTRACT_IO[graph][1]
            # what the runtime reads must be what the graph has
            sess = ort_session(out / entry["path"])
            assert [i.name for i in sess.get_inputs()] == [t["name"] for t in entry["inputs"]]
            assert {o.name for o in sess.get_outputs()} == {t["name"] for t in entry["outputs"]}
            assert [o.type for o in sess.get_outputs()] == [f"tensor({'float' if t['dtype'] == 'float32' else t['dtype']})"
                                                           for t in entry["outputs"]]
            for spec, real in zip(entry["inputs"], sess.get_inputs()):
                assert real.type == "tensor(float)" and spec["dtype"] == "float32"
                for a, b in zip(spec["shape"], real.shape):
                    assert a == b or isinstance(a, str)
    assert files_on_disk == listed, "every file is listed in the manifest, nothing else is there"
    # encoders keep weights in one external data file, listed with its own sha256
    assert manifest["graphs"]["encoder"]["fp32"]["external_data"] == "encoder.onnx.data"
    assert not leftovers(out.parent)


def _encoder_errors(onnx_path: Path, model: torch.nn.Module, size: int, seed: int = 5) -> tuple[float, float]:
    """(max relative error, cosine) of an ONNX encoder against the torch encoder, on our own input."""
    x = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = model.image_encoder(torch.from_numpy(x)).numpy().astype(np.float64)
    got = ort_session(onnx_path).run(None, {"image": x})[0].astype(np.float64)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
    return rel, cos


def test_precisions_meet_their_floors(exported, adapted_lora):
    """Each exported encoder against the UNMERGED adapter model, on an input the export never saw."""
    out, manifest = exported
    enc = manifest["graphs"]["encoder"]
    for precision, entry in enc.items():
        rel, cos = _encoder_errors(out / entry["path"], adapted_lora.model, 256)
        if precision == "fp32":
            assert rel <= 1e-4, rel
        else:
            assert 0.99 <= cos and rel < 0.2, (precision, rel, cos)
            assert rel > 1e-6  # really another precision, not the fp32 graph under another name
    assert enc["fp16"]["bytes"] < 0.6 * enc["fp32"]["bytes"]
    # int8 stores every Linear (MatMul) weight in 1 byte instead of 4; the convolutions stay fp32
    # (most of the tiny model's bytes are its neck's 3x3 convolution, under 1 % of vit_b's).
    import onnx

    fp32 = onnx.load(str(out / enc["fp32"]["path"]), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in fp32.initializer}
    matmul_weights = sum(int(np.prod(dims[n.input[1]])) for n in fp32.node if n.op_type == "MatMul" and n.input[1] in dims)
    assert matmul_weights > 0 and enc["int8"]["bytes"] < enc["fp32"]["bytes"] - 2.5 * matmul_weights
    # Meta's decoders against SamPredictor: measured in test_meta_decoder_matches_sam_predictor and
    # test_decoder_lowres_batch_equals_single_calls, not read back from the export's own record


def test_fp16_encoder_graph_keeps_layernorm_in_fp32(exported):
    import onnx
    from onnx import TensorProto

    out, manifest = exported
    entry = manifest["graphs"]["encoder"]["fp16"]
    assert entry["exporter"] == "dynamo" and entry["opset"] == 18  # traced without real fp16 compute
    model = onnx.load(str(out / entry["path"]), load_external_data=False)
    assert {o.version for o in model.opset_import if o.domain == ""} == {18}
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    dtype.update({t.name: t.data_type for t in g.initializer})
    assert [dtype[v.name] for v in [*g.input, *g.output]] == [TensorProto.FLOAT] * 2
    ops: dict[str, set] = {}
    for node in g.node:
        ops.setdefault(node.op_type, set()).update(dtype.get(x) for x in [*node.input, *node.output] if x)
    # LayerNorm (one node) and the neck's LayerNorm2d (ReduceMean/Pow/Sqrt) in fp32 only
    for op in ("LayerNormalization", "ReduceMean", "Pow", "Sqrt"):
        assert ops[op] <= {TensorProto.FLOAT, TensorProto.INT64}, op
    assert ops["MatMul"] == {TensorProto.FLOAT16} and ops["Conv"] == {TensorProto.FLOAT16}
    big = [t for t in g.initializer if np.prod(t.dims) >= 4096]
    assert big and all(t.data_type == TensorProto.FLOAT16 for t in big)


def test_decoder_lowres_batch_equals_single_calls(exported):
    out, manifest = exported
    sess = ort_session(out / manifest["graphs"]["decoder_lowres"]["fp32"]["path"])
    rng = np.random.default_rng(0)
    b, n = 4, 3
    feeds = {
        "image_embeddings": rng.standard_normal((1, 256, 16, 16)).astype(np.float32),
        "point_coords": (rng.random((b, n, 2)) * 256).astype(np.float32),
        "point_labels": np.array([[1, 0, -1], [1, 1, -1], [2, 3, 1], [0, 1, -1]], np.float32),
        "mask_input": rng.standard_normal((b, 1, 64, 64)).astype(np.float32),
        "has_mask_input": np.array([0, 1, 0, 1], np.float32),
    }
    low, iou = sess.run(["low_res_masks", "iou_predictions"], feeds)
    assert low.shape == (b, 4, 64, 64) and iou.shape == (b, 4)
    for i in range(b):
        one = {k: (v if k == "image_embeddings" else v[i : i + 1]) for k, v in feeds.items()}
        low_i, iou_i = sess.run(["low_res_masks", "iou_predictions"], one)
        np.testing.assert_allclose(low[i : i + 1], low_i, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(iou[i : i + 1], iou_i, rtol=1e-4, atol=1e-5)


def test_preprocess_in_graph_matches_numpy_preprocessing(exported):
    from peft_export.runtime.preprocess import prepare_image, resize_longest_side, to_uint8
    from peft_export.runtime.intensity import normalize_intensity

    out, manifest = exported
    rng = np.random.default_rng(1)
    image = (rng.random((150, 200, 3)) * 255).astype(np.uint8)
    rule = manifest["preprocessing"]["intensity"]
    x, _, input_size = prepare_image(image, rule, 256, interpolation=manifest["preprocessing"]["interpolation"])
    resized = resize_longest_side(to_uint8(normalize_intensity(image, rule)), 256,
                                  manifest["preprocessing"]["interpolation"])
    assert resized.shape[:2] == input_size
    enc = ort_session(out / "encoder.onnx").run(None, {"image": x})[0]
    pre = ort_session(out / manifest["graphs"]["encoder_preprocess"]["fp32"]["path"]).run(
        None, {"image": resized.astype(np.float32)})[0]
    np.testing.assert_allclose(pre, enc, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("image_size", [128])
def test_meta_decoder_matches_sam_predictor(tmp_path, image_size):
    sam = merge_peft(make_adapted(MERGEABLE_CONFIGS["lora-qv-alpha"], image_size=image_size, seed=3).model)
    path = tmp_path / "decoder.onnx"
    export_decoder_onnx(sam, path, "decoder")
    sess = ort_session(path)
    predictor = SamPredictor(sam)
    rng = np.random.default_rng(2)
    image = (rng.random((90, 140, 3)) * 255).astype(np.uint8)
    predictor.set_image(image)
    g = image_size // 16
    cases = [
        (np.array([[70.0, 40.0]]), np.array([1]), None),
        (np.array([[30.0, 20.0], [100.0, 60.0]]), np.array([1, 0]), None),
        (None, None, np.array([20.0, 10.0, 110.0, 80.0])),
        (np.array([[60.0, 45.0]]), np.array([1]), np.array([10.0, 5.0, 120.0, 85.0])),
    ]
    for coords, labels, box in cases:
        masks_ref, iou_ref, _ = predictor.predict(coords, labels, box, multimask_output=True)
        pts, labs = [], []
        if coords is not None:
            pts.append(predictor.transform.apply_coords(coords, image.shape[:2]))
            labs.append(labels)
        if box is not None:
            pts.append(predictor.transform.apply_boxes(box[None], image.shape[:2]).reshape(2, 2))
            labs.append(np.array([2, 3]))
        else:
            pts.append(np.zeros((1, 2)))
            labs.append(np.array([-1]))
        masks, iou, low = sess.run(None, {
            "image_embeddings": predictor.features.numpy(),
            "point_coords": np.concatenate(pts)[None].astype(np.float32),
            "point_labels": np.concatenate(labs)[None].astype(np.float32),
            "mask_input": np.zeros((1, 1, 4 * g, 4 * g), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(image.shape[:2], np.float32),
        })
        assert masks.shape == (1, 4, 90, 140) and low.shape == (1, 4, 4 * g, 4 * g)
        ours = masks[0, 1:] > 0
        inter, union = (ours & masks_ref).sum(), (ours | masks_ref).sum()
        assert union > 0 and inter / union >= 0.99
        np.testing.assert_allclose(iou[0, 1:], iou_ref, atol=1e-4)


def test_adaptformer_in_graph_through_the_cli(tmp_path):
    from peft_export.cli.main import app

    adapted = make_adapted(dict(method="adaptformer", blocks="all", bottleneck=16), image_size=192, seed=1)
    save_adapter(adapted, tmp_path / "run")
    out = tmp_path / "exp"
    result = CliRunner().invoke(app, ["merge-and-export", "--adapter", str(tmp_path / "run"), "--out", str(out),
                                      "--meta-decoder"])
    assert result.exit_code == 0, result.output
    assert "decoder_lowres" in result.output and "ok" in result.output
    for flavour in ("decoder", "decoder_lowres"):  # --meta-decoder: Meta's graphs written and verified
        assert (out / f"{flavour}.onnx").is_file()
        assert re.search(rf"^\s+{flavour}\s+fp32\s.*\sok$", result.output, re.M), result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merged"] is False and manifest["in_graph_adapters"] == ["adaptformer"]
    assert manifest["image_size"] == 192 and manifest["embedding_shape"] == [256, 12, 12]
    # the adapter branch is really in the graph: the export computes what the unmerged model does
    rel, _ = _encoder_errors(out / "encoder.onnx", adapted.model, 192)
    assert rel <= 1e-4
    from peft_export.models import load_sam

    base, _ = load_sam("tiny", None, 192, seed=1, warn_random=False)  # the adapter's base (same seed)
    assert _encoder_errors(out / "encoder.onnx", base, 192)[0] > 1e-3  # ...and not what the base does
    # an existing export is refused without --overwrite, kept as it was
    before = sorted(p.name for p in out.iterdir())
    again = CliRunner().invoke(app, ["merge-and-export", "--adapter", str(tmp_path / "run"), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output
    assert sorted(p.name for p in out.iterdir()) == before


FAMILY = {"encoder", "split_image", "split_prompts", "split_masks", "click_decoder"}


def test_default_export_has_no_meta_decoder_and_the_family_alone_runs_everything(tmp_path):
    """The default export (CLI, no --meta-decoder, no TensorRT) holds no Meta graph (decoder.onnx,
    decoder_lowres.onnx), only the encoder, the family and the click decoder. On it SamSession.predict
    (with the mask fed back) and predict_batch match SamPredictor on the merged model, and `predict`
    (box, --everything) and `bench`'s decoder components run."""
    from peft_export.bench import run_bench
    from peft_export.cli.main import app
    from peft_export.predict import read_image
    from peft_export.runtime import SamSession
    from peft_export.runtime.intensity import normalize_intensity
    from peft_export.runtime.preprocess import to_uint8

    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128, seed=4)
    with torch.no_grad():  # masks that are not empty: the random tiny decoder's mask heads scaled up
        for mlp in adapted.model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
            mlp.layers[-1].bias.mul_(30.0)
    save_adapter(adapted, tmp_path / "run")
    out = tmp_path / "exp"
    result = CliRunner().invoke(app, ["merge-and-export", "--adapter", str(tmp_path / "run"), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert set(manifest["graphs"]) == FAMILY and not manifest["refused"]
    assert not list(out.glob("decoder*.onnx"))
    assert pipeline.decoder_flavours(False, True) == ("decoder_lowres",)  # TensorRT builds its engine from it
    assert pipeline.decoder_flavours(True, False) == ("decoder", "decoder_lowres")  # --meta-decoder: other tools

    session = SamSession(out)
    assert session.describe()["decoder_used"] == "family"
    rng = np.random.default_rng(3)
    image = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(merge_peft(adapted.model).eval())
    # what the runtime feeds the model: the export's intensity rule, then uint8 RGB
    predictor.set_image(to_uint8(normalize_intensity(image, manifest["preprocessing"]["intensity"])))
    session.set_image(image)

    def close(ours, ref, iou, ref_iou):  # ONNX Runtime vs torch: float rounding only
        assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max() and np.abs(iou - ref_iou).max() < 1e-3

    for kwargs in (dict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1])),
                   dict(box=np.array([20.0, 15.0, 90.0, 70.0]))):
        ref, ref_iou, ref_low = predictor.predict(**kwargs, return_logits=True)
        logits, iou, low = session.predict(**kwargs, return_logits=True)
        close(logits, ref, iou, ref_iou)
        ref, ref_iou, _ = predictor.predict(**kwargs, mask_input=ref_low[:1], return_logits=True)
        logits, iou, _ = session.predict(**kwargs, mask_input=low[:1], return_logits=True)
        close(logits, ref, iou, ref_iou)
    boxes = np.array([[20.0, 15.0, 90.0, 70.0], [5.0, 5.0, 60.0, 50.0]])
    _, iou, low = session.predict_batch(boxes=boxes, masks=False)
    for i, box in enumerate(boxes):
        _, ref_iou, ref_low = predictor.predict(box=box, multimask_output=False, return_logits=True)
        close(low[i], ref_low, iou[i], ref_iou)

    # The CLI's predict on the family-only export: the mask the session gives, and segment-everything.
    import tifffile

    tifffile.imwrite(tmp_path / "img.tif", image)
    res = CliRunner().invoke(app, ["predict", str(out), str(tmp_path / "img.tif"), "--box", "20,15,90,70",
                                   "--single-mask", "--out", str(tmp_path / "pred"), "-q"])
    assert res.exit_code == 0, res.output
    masks, _, _ = session.predict(box=np.array([20.0, 15.0, 90.0, 70.0]), multimask_output=False)
    written = read_image(tmp_path / "pred" / "img_mask.tif")
    assert masks[0].any() and np.array_equal(written > 0, masks[0])
    res = CliRunner().invoke(app, ["predict", str(out), str(tmp_path / "img.tif"), "--everything",
                                   "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0",
                                   "--out", str(tmp_path / "all"), "-q"])
    assert res.exit_code == 0, res.output
    labels, records = session.segment_everything(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert len(records) > 0 and np.array_equal(read_image(tmp_path / "all" / "img_labels.tif"), labels)

    # bench times the family (split_prompts + split_masks per call) on it, as the runtime runs it
    bench = run_bench(export_dir=out, backends=["onnxruntime"], components=["decoder_point", "decoder_box",
                      "decoder_boxes"], batch_sizes=(3,), iterations=2, warmup=1, intra_op_threads=1)
    case = next(c for c in bench["cases"] if c["case"] == "export onnxruntime-cpu fp32")
    assert case["status"] == "ok", case
    assert set(case["components"]) == {"decoder_point", "decoder_box", "decoder_boxes_b3"}
    assert case["details"]["decoder"] == {"one_prompt": "family", "batch": "family"}
    assert {"split_image", "split_prompts", "split_masks"} <= set(case["details"]["graphs"])


def test_bad_inputs_fail_before_writing(tmp_path):
    from peft_export.cli.main import app

    adapted = make_adapted(MERGEABLE_CONFIGS["ssf"], image_size=128)
    with pytest.raises(PeftExportError, match="precision"):
        merge_and_export(adapted, tmp_path / "a", precisions=("int4",), progress=False)
    with pytest.raises(PeftExportError, match="format"):
        merge_and_export(adapted, tmp_path / "a", formats=("tflite",), progress=False)
    with pytest.raises(PeftExportError, match="opset"):
        merge_and_export(adapted, tmp_path / "a", opset=16, progress=False)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(PeftExportError, match="not a directory"):
        merge_and_export(adapted, a_file / "export", progress=False)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(PeftExportError, match="not empty"):
        merge_and_export(adapted, full, progress=False)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    result = CliRunner().invoke(app, ["merge-and-export", "--merged", str(tmp_path / "missing.pth"),
                                      "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "missing.pth" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "full"]


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    adapted = make_adapted(MERGEABLE_CONFIGS["ssf"], image_size=128)
    monkeypatch.setitem(verify.THRESHOLDS["fp32"], "embeddings_max_rel", 1e-12)
    with pytest.raises(PeftExportError, match="encoder fp32 failed verification"):
        merge_and_export(adapted, tmp_path / "exp", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    adapted = make_adapted(MERGEABLE_CONFIGS["ssf"], image_size=128)
    real = pipeline.og.export_encoder_onnx

    def export_then_interrupt(model, path, *args, **kwargs):
        real(model, path, *args, **kwargs)  # a real, complete file in the temp dir
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.og, "export_encoder_onnx", export_then_interrupt)
    old = tmp_path / "exp"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        merge_and_export(adapted, old, overwrite=True, progress=False)
    # the old export is untouched and no temporary directory is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    assert [p.name for p in old.iterdir()] == ["manifest.json"]


@pytest.mark.slow
def test_vit_b_encoder_export_parity(tmp_path):
    from peft_export.export import export_encoder_onnx
    from peft_export.merge import error_stats, probe_inputs
    from peft_export.models import load_sam

    sam, _ = load_sam("vit_b", None, None, seed=0, warn_random=False)
    path = tmp_path / "encoder.onnx"
    export_encoder_onnx(sam, path, 17)
    assert (tmp_path / "encoder.onnx.data").stat().st_size > 300e6
    image, _ = probe_inputs(1024, 0)
    with torch.no_grad():
        ref = sam.image_encoder(image)
    emb = ort_session(path).run(None, {"image": image.numpy()})[0]
    stats = error_stats(ref, torch.from_numpy(emb))
    assert stats["max_rel"] <= 1e-4, stats


class _NoOnnxOp(torch.nn.Module):
    """Adds a symmetric eigen-decomposition (no ONNX translation) so that the dynamo exporter fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = x[0, 0, :4, :4].float()
        return x + torch.linalg.eigh(patch @ patch.T)[0].sum().to(x.dtype)


def test_failed_fp16_dynamo_export_fails_with_the_reason_instead_of_falling_back(tmp_path):
    from peft_export.export.onnx_graphs import export_encoder_onnx

    model = make_adapted(MERGEABLE_CONFIGS["freeze-encoder"], image_size=64).model
    model.image_encoder.neck = torch.nn.Sequential(model.image_encoder.neck, _NoOnnxOp())
    with pytest.raises(PeftExportError, match=r"encoder\.fp16\.onnx: the dynamo ONNX exporter failed \(\w+: .+\)"):
        export_encoder_onnx(model, tmp_path / "encoder.fp16.onnx", precision="fp16")
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no TorchScript attempt left behind
