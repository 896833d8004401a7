"""A SAM 2 export and the torch-free session on it: the same masks as sam2's own ``SAM2ImagePredictor`` and
``SAM2AutomaticMaskGenerator`` (random hiera_t with random non-zero merged LoRA), int8 through the gate, OpenVINO,
and one-line errors for what a SAM 2 export cannot do.

The module's export is at 128 px (the model takes any multiple of 32; a small size keeps the encoder runs, the
OpenVINO compiles and the int8 gate cheap); the issue's 1024² and non-square check (32 prompts in all, one
export) is its own test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")

from helpers import randomize_trainables  # noqa: E402
from peft_export.errors import PeftExportError  # noqa: E402
from peft_export.export.pipeline import merge_and_export  # noqa: E402
from peft_export.export.quantize import Int8Recipe  # noqa: E402
from peft_export.models.sam2 import sam2_predictor  # noqa: E402
from peft_export.peft import PeftConfig, build_adapted_model, merge_peft  # noqa: E402
from peft_export.runtime import SamSession  # noqa: E402

pytestmark = pytest.mark.slow  # exports (as every export test)
T = "sam2.1_hiera_t"
SIZE = 128  # the module export's


def lora_sam2(size: int):
    cfg = PeftConfig("lora", blocks="late", rank=4, targets=("q", "v", "mlp"))
    adapted = build_adapted_model(cfg, T, None, size, seed=0)
    randomize_trainables(adapted.model, seed=7, scale=0.02)
    return adapted


def export(adapted, out, precisions=("fp32",)):
    # int8 with ONNX Runtime's plain dynamic recipe: the default one (GPTQ + search) costs minutes here
    recipe = Int8Recipe() if "int8" in precisions else None
    return merge_and_export(adapted, out, precisions=precisions, progress=False, int8_recipe=recipe)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The module's export (fp32, int8), made from a saved adapter run (``RUN``, beside it): its manifest records
    the adapter, so ``peftexport bench EXPORT`` times the torch model too."""
    from peft_export.peft import save_adapter
    from peft_export.peft.adapters import load_model_source

    root = tmp_path_factory.mktemp("sam2")
    save_adapter(lora_sam2(SIZE), root / "run")
    adapted = load_model_source(adapter=root / "run")
    manifest = export(adapted, root / "export", ("fp32", "int8"))
    return root / "export", manifest, merge_peft(adapted.model)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    image = np.kron(low, np.ones((8, 8, 1)))[:h, :w] + rng.normal(0, 10, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def prompt_set(h: int, w: int, seed: int, n: int = 32) -> list[dict]:
    """``n`` prompts: single points (multimask), boxes, box + point, positive + negative points; every fourth
    call after the first round feeds the previous low-res logits back as mask input."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = min(w, x + rng.uniform(8, w / 2)), min(h, y + rng.uniform(8, h / 2))
        kind = i % 4
        if kind == 0:
            out.append(dict(point_coords=np.array([[x, y]]), point_labels=np.array([1]), multimask_output=True))
        elif kind == 1:
            out.append(dict(box=np.array([x, y, x1, y1]), multimask_output=False))
        elif kind == 2:
            out.append(dict(box=np.array([x, y, x1, y1]), point_coords=np.array([[(x + x1) / 2, (y + y1) / 2]]),
                            point_labels=np.array([1]), multimask_output=False))
        else:
            out.append(dict(point_coords=np.array([[x, y], [rng.uniform(0, w), rng.uniform(0, h)]]),
                            point_labels=np.array([1, 0]), multimask_output=False, mask_input=i >= 8))
    return out


def compare_with_predictor(session, model, image: np.ndarray, seed: int, n: int = 32) -> dict:
    predictor = sam2_predictor(model)
    predictor.set_image(image)
    session.set_image(image)
    inter = union = 0
    rel = iou_diff = 0.0
    positive = []
    previous = None
    for p in prompt_set(*image.shape[:2], seed, n):
        p = dict(p)
        if p.pop("mask_input", False):
            p["mask_input"] = previous
        ref, ref_iou, ref_low = predictor.predict(**p, return_logits=True)
        got, got_iou, got_low = session.predict(**p, return_logits=True)
        assert got.shape == ref.shape and got_low.shape == ref_low.shape
        inter += int(((ref > 0) & (got > 0)).sum())
        union += int(((ref > 0) | (got > 0)).sum())
        rel = max(rel, float(np.abs(ref_low - got_low).max() / np.abs(ref_low).max()))
        iou_diff = max(iou_diff, float(np.abs(ref_iou - got_iou).max()))
        positive.append(float((ref > 0).mean()))
        previous = ref_low[np.argmax(ref_iou)][None]
    return {"mask_iou": inter / union, "logits_max_rel": rel, "iou_max_abs": iou_diff, "positive": positive}


def test_manifest_says_what_the_runtime_needs(exported):
    out, manifest, _ = exported
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["family"] == "sam2" and on_disk["model_type"] == T and on_disk["image_size"] == SIZE
    assert on_disk["preprocessing"]["resize"] == "square" and on_disk["low_res_size"] == SIZE // 4
    assert on_disk["decoder_selection"] == {"stability_delta": 0.05, "stability_thresh": 0.98}
    enc, dec = on_disk["graphs"]["encoder"], on_disk["graphs"]["decoder"]["fp32"]
    assert [o["name"] for o in enc["fp32"]["outputs"]] == ["image_embeddings", "high_res_feats_0", "high_res_feats_1"]
    assert [o["name"] for o in dec["outputs"]] == ["low_res_masks", "iou_predictions", "sam_output_tokens",
                                                   "object_score_logits"]
    assert enc["fp32"]["parity"]["embeddings_max_rel"] <= 1e-4 and dec["parity"]["mask_logits_max_rel"] <= 1e-4
    assert "openvino" in enc["fp32"]["verified_on"]
    with np.load(out / on_disk["constants"]["path"]) as c:
        assert c["no_mem_embed"].shape == (1, 256) and c["vision_pos_enc"].shape == (1, 256, SIZE // 16, SIZE // 16)
    assert on_disk["merge_report"]["errors"]["embeddings"]["max_rel"] <= 1e-5


def test_session_equals_sam2_image_predictor_square_and_non_square(exported):
    out, _, model = exported
    session = SamSession(out)
    assert type(session).__name__ == "Sam2Session"
    for seed, (h, w) in enumerate([(SIZE, SIZE), (150, 230)]):
        found = compare_with_predictor(session, model, smooth_image(h, w, seed), seed, n=16)  # 32 in all
        print(f"{SIZE} px export, {h} x {w} image: mask IoU {found['mask_iou']:.6f}, "
              f"logits max rel {found['logits_max_rel']:.2e}")
        assert found["mask_iou"] >= 0.99 and found["logits_max_rel"] <= 1e-3, found
        assert found["iou_max_abs"] <= 1e-4, found
        assert 0.01 < np.mean(found["positive"]) < 0.99  # masks that could disagree


def test_predict_batch_equals_predict_per_object_and_openvino_equals_onnxruntime(exported):
    out, _, _ = exported
    image = smooth_image(200, 180, 3)
    boxes = np.array([[10, 20, 90, 120], [50, 40, 170, 190], [0, 0, 60, 60]], np.float64)
    sessions = [SamSession(out), SamSession(out, backend="openvino")]
    for session in sessions:
        session.set_image(image)
    masks, ious, lows = sessions[0].predict_batch(boxes=boxes, return_logits=True)
    for k, box in enumerate(boxes):
        m, iou, low = sessions[0].predict(box=box, multimask_output=False, return_logits=True)
        np.testing.assert_allclose(low, lows[k], rtol=0, atol=1e-4 * np.abs(low).max())
        ov, _, _ = sessions[1].predict(box=box, multimask_output=False, return_logits=True)
        assert ((ov > 0) == (m > 0)).mean() > 0.999


def test_int8_encoder_passed_the_gate_and_runs(exported):
    out, manifest, _ = exported
    entry = manifest["graphs"]["encoder"]["int8"]
    gate = entry["parity"]["prompt_agreement"]
    assert gate["prompts"] == 32 and gate["mask_iou_mean"] >= 0.99 and gate["mask_iou_min"] >= 0.97
    sessions = {p: SamSession(out, precision=p) for p in ("fp32", "int8")}
    from peft_export.runtime.backends.ov import native_bf16

    if "openvino" in entry["verified_on"] and native_bf16() is None:
        # checked in OpenVINO's bf16 mode too (int8 layers, the rest bf16: the fastest hiera_t there) and run so
        # where it passed; this random 128 px model's bf16 mode misses the gate's mean by a hair (0.98999), so
        # OpenVINO runs its int8 encoder in f32 mode: recorded, not refused
        bf16_mode = entry["parity_by_backend"]["openvino-bf16"]
        assert ("openvino-bf16" in entry["verified_on"]) == bf16_mode["passed"]
        assert bf16_mode["passed"] or bf16_mode["failures"]
        sessions["int8 (openvino)"] = SamSession(out, backend="openvino", precision="int8")
        assert sessions["int8 (openvino)"].describe()["graphs"]["encoder"]["bf16_mode"] == bf16_mode["passed"]
    # measured here, not read back: the int8 encoder's masks agree with fp32's on an image neither the
    # tuning nor the gate saw (16 single clicks; looser than the gate, which is on its own image)
    image = smooth_image(128, 128, 5)
    for s in sessions.values():
        s.set_image(image)
    ious = []
    for y in range(16, 128, 32):
        for x in range(16, 128, 32):
            best = {}
            for p, s in sessions.items():
                masks, iou, _ = s.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]))
                assert masks.shape == (3, 128, 128) and np.isfinite(iou).all()
                best[p] = masks[int(np.argmax(iou))]
            for p in best:
                if p != "fp32":
                    union = (best["fp32"] | best[p]).sum()
                    ious.append((best["fp32"] & best[p]).sum() / union if union else 1.0)
    assert np.mean(ious) >= 0.97, ious


def test_sam2_int8_tuning_images_are_probe_images_the_gate_never_sees():
    """Without --calibration-data SAM 2's int8 recipe is tuned on probe images of seeds 1 and 2 through SAM 2's
    normalisation, with prompts of seed 1; the gate measures on the probe image of seed 0 with prompts of seed 0."""
    from peft_export.export.agreement import gate_prompts
    from peft_export.export.int8_data import GATE_PROMPT_SEED, SEARCH_PROMPT_SEED, split_int8_data
    from peft_export.export.sam2_image_graphs import sam2_probe_image
    from peft_export.merge import probe_pixels
    from peft_export.runtime.sam2_preprocess import SAM2_PIXEL_MEAN, SAM2_PIXEL_STD

    data = split_int8_data(128, probe=sam2_probe_image)
    assert data.calibration is None and data.held_out == [] and len(data.tuning) == 2
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (SAM2_PIXEL_MEAN, SAM2_PIXEL_STD))
    for seed, x in zip((1, 2), data.tuning):  # SAM2Transforms: /255, then ImageNet mean and std
        np.testing.assert_allclose(x, (probe_pixels(128, seed).numpy() / 255 - mean) / std, rtol=0, atol=1e-5)
    gate = sam2_probe_image(128, 0)
    assert all(not np.allclose(x, gate) for x in data.tuning)
    assert data.record["tuning"]["images"] == ["probe image, seed 1", "probe image, seed 2"]
    assert not torch.equal(gate_prompts(128, 32, SEARCH_PROMPT_SEED)[0], gate_prompts(128, 32, GATE_PROMPT_SEED)[0])


def test_sam2_int8_tuning_and_gate_data_never_meet(tmp_path, monkeypatch):
    """A real SAM 2 int8 export with --calibration-data: what calibrates the graph and what the gate measures on,
    recorded as the export runs them (the real functions, wrapped)."""
    import tifffile

    from peft_export.export import int8_data
    from peft_export.export.calibration import calibration_inputs
    from peft_export.export.sam2_image_graphs import sam2_probe_image
    from peft_export.runtime.sam2_preprocess import prepare_sam2_image

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i, name in enumerate("abc"):
        tifffile.imwrite(calibration / f"{name}.tif", smooth_image(96 + 16 * i, 128, 20 + i))
    adapted = lora_sam2(128)
    planes, _ = calibration_inputs(calibration, 128, dict(adapted.intensity),
                                   prepare=lambda plane, rule, s: prepare_sam2_image(plane, rule, s)[0])
    calibrated, measured = [], []
    quantize, agree = int8_data.quantize_int8, int8_data.Agreement.__call__

    def quantize_spy(src, dst, recipe, calibration=None, rounded=None):
        calibrated.extend(calibration or [])
        return quantize(src, dst, recipe, calibration, rounded)

    def agree_spy(self, path, backend="onnxruntime"):
        measured.append((self.seed, list(self.images)))
        return agree(self, path, backend)

    monkeypatch.setattr(int8_data, "quantize_int8", quantize_spy)
    monkeypatch.setattr(int8_data.Agreement, "__call__", agree_spy)
    manifest = merge_and_export(adapted, tmp_path / "export", precisions=("fp32", "int8"), progress=False,
                                calibration_data=calibration, int8_recipe=Int8Recipe())
    # plane 1 (b.tif) is held out: the gate's with the probe image; a.tif and c.tif calibrate
    assert len(calibrated) == 2 and all(np.array_equal(x, planes[i]) for x, i in zip(calibrated, (0, 2)))
    assert measured and all(seed == 0 and len(images) == 1 and np.array_equal(images[0], planes[1])
                            for seed, images in measured)
    gate = sam2_probe_image(128, 0)
    assert not any(np.allclose(x, gate) or np.array_equal(x, planes[1]) for x in calibrated)
    entry = manifest["graphs"]["encoder"].get("int8") or next(r for r in manifest["refused"] if r["graph"] == "encoder")
    assert entry["int8_data"]["tuning"]["images"] == ["a.tif", "c.tif"]
    assert entry["int8_data"]["gate"]["images"] == ["probe image, seed 0", "b.tif"]
    assert entry["int8_recipe"]["static"] and entry["int8_recipe"]["calibration_images"] == 2
    assert entry["int8_recipe"]["rounding"] == "nearest" and not entry["int8_recipe"]["gptq_changed"]
    if "int8" in manifest["graphs"]["encoder"]:  # passed: on the probe image and on the held-out plane
        assert entry["parity"]["held_out_agreement"]["images"] == 1


def test_segment_everything_equals_sam2_automatic_mask_generator(exported):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    out, _, model = exported
    image = smooth_image(160, 200, 9)
    # filters off (a random model predicts low IoUs and large overlapping masks): all 3 x 36 candidates compared
    options = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    generator = SAM2AutomaticMaskGenerator(model, **options)
    generator.predictor = sam2_predictor(model)
    def key(r):
        return (r["point_coords"][0][1], r["point_coords"][0][0], -r["predicted_iou"])

    ref = sorted(generator.generate(image), key=key)
    session = SamSession(out)
    session.set_image(image)
    labels, records = session.segment_everything(**options, return_masks=True)
    got = sorted(records, key=key)
    assert len(ref) == len(got) == 108
    for a, b in zip(ref, got):
        inter = (a["segmentation"] & b["segmentation"]).sum()
        assert inter / (a["segmentation"] | b["segmentation"]).sum() >= 0.99
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-4 and a["area"] == pytest.approx(b["area"], rel=0.01)
    assert labels.shape == image.shape[:2] and 0 < labels.max() <= len(got)  # a mask covered by smaller ones shows none


def bench(*args: str) -> subprocess.CompletedProcess:
    from peft_export.training.host_memory import user_tuned_malloc

    # Earlier tests may leave MALLOC_* in os.environ (dask's nanny sets one for its workers): the command runs
    # with malloc untuned, as a user's shell starts it.
    env = {k: v for k, v in os.environ.items() if not user_tuned_malloc({k: v})}
    return subprocess.run([sys.executable, "-m", "peft_export.cli", "bench", *args, "--warmup", "0", "--iterations", "1",
                           "-q"], capture_output=True, text=True, env=env)


def test_evaluate_scores_the_torch_run_and_its_export_alike(exported, tmp_path):
    """``evaluate run=RUN export=EXPORT`` on a SAM 2 run: the torch side is SAM2ImagePredictor and
    SAM2AutomaticMaskGenerator (it used SAM's predictor and failed), and it scores what the export scores."""
    from peft_export.data import make_demo_data
    from peft_export.evaluation import evaluate_models

    export_dir = exported[0]
    make_demo_data(tmp_path / "data", n_images=2, size=SIZE, seed=5)
    report = evaluate_models([f"run={export_dir.parent / 'run'}", f"export={export_dir}"], tmp_path / "data",
                             prompts=["point", "box"], iterations=0, everything=True,
                             everything_options={"points_per_side": 6, "pred_iou_thresh": 0.0,
                                                 "stability_score_thresh": 0.0},
                             max_objects_per_image=4, progress=False, log=lambda m: None)
    run, exp = report["models"]["run"], report["models"]["export"]
    assert run["backend"] == "torch" and exp["backend"] == "onnxruntime"
    for key in ("point", "box"):
        assert abs(run["interactive"]["metrics"][key]["dice"] - exp["interactive"]["metrics"][key]["dice"]) <= 0.005
    assert all(e["n_pred"] > 0 for e in run["automatic"]["per_image"] + exp["automatic"]["per_image"])
    assert abs(run["automatic"]["msa"] - exp["automatic"]["msa"]) <= 0.02


def test_bench_export_times_hiera_in_torch_at_its_best_and_every_exported_precision_and_backend(exported, tmp_path):
    """``peftexport bench EXPORT`` on a SAM 2 export (its manifest names the adapter run): the encoder and the
    decoder in torch (the adapter unmerged, merged, and merged with freed memory kept), ONNX Runtime and OpenVINO,
    fp32 and int8, each case in a fresh process; the export's workers never import torch."""
    from peft_export.bench import detect_availability

    out, manifest, _ = exported
    assert set(manifest["graphs"]["encoder"]) == {"fp32", "int8"}
    done = bench(str(out), "--backend", "torch,onnxruntime,openvino", "--components", "encoder,decoder_box", "--no-base",
                 "-o", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["settings"]["family"] == "sam2" and result["settings"]["image_size"] == SIZE
    ok = {c["case"]: c for c in result["cases"] if c["status"] == "ok"}
    available = detect_availability()  # torch at its best: freed memory kept where glibc is there (malloc untuned)
    best = {"merged torch fp32 (freed memory kept)"} if available.glibc else set()
    assert set(ok) == {"unmerged torch fp32", "merged torch fp32", "export onnxruntime-cpu fp32",
                       "export onnxruntime-cpu int8", "export openvino-cpu fp32", "export openvino-cpu int8"} | best, \
        [(c["case"], c.get("reason")) for c in result["cases"]]
    for name, case in ok.items():
        assert set(case["components"]) == {"encoder", "decoder_box"}, name
        assert all(c["median_ms"] > 0 for c in case["components"].values())
        assert case["process"]["torch_imported"] == (not name.startswith("export")), name
    assert ok["export onnxruntime-cpu int8"]["details"]["graphs"]["encoder"]["precision"] == "int8"
    assert all(" torch " in ok_case for ok_case in result["reference"].values())  # ratios against torch's fastest


def test_bench_adapter_makes_a_temporary_sam2_export_and_ais_is_refused(exported, tmp_path):
    """``peftexport bench --adapter RUN`` without an export: a temporary fp32 export of the adapter is timed (in
    this process here). micro-sam's AIS component is timed for SAM only: refused by name before any work."""
    from peft_export.bench import run_bench

    out, _, _ = exported
    done = bench("--adapter", str(out.parent / "run"), "--backend", "onnxruntime", "--precision", "fp32",
                 "--components", "encoder,decoder_box", "--in-process", "-o", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["settings"]["temporary_export"] and result["settings"]["family"] == "sam2"
    case, = result["cases"]
    assert case["case"] == "export onnxruntime-cpu fp32" and case["status"] == "ok", case
    assert set(case["components"]) == {"encoder", "decoder_box"} and case["details"]["graphs"]["encoder"]["precision"] == "fp32"
    with pytest.raises(PeftExportError, match="--components ais: not timed for SAM 2 models"):
        run_bench(out, components=("ais",))


def test_what_a_sam2_export_cannot_do_is_one_clear_error(exported, tmp_path):
    out, _, _ = exported
    session = SamSession(out)
    with pytest.raises(PeftExportError, match="no image set"):
        session.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    session.set_image(smooth_image(64, 64, 1))
    with pytest.raises(PeftExportError, match=r"mask_input: expected shape \(1, 32, 32\)"):
        session.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]), mask_input=np.zeros((1, 64, 64)))
    with pytest.raises(PeftExportError, match="no instance decoder"):
        session.segment_instances()
    with pytest.raises(PeftExportError, match="precision: .*no fp16 encoder"):
        SamSession(out, precision="fp16")
    from peft_export.models.sam2 import random_sam2

    torch.save({"model": random_sam2(T, 128).state_dict()}, tmp_path / "sam2.pt")
    cli = subprocess.run([sys.executable, "-m", "peft_export.cli", "merge-and-export", "--merged", str(tmp_path / "sam2.pt"),
                          "--image-size", "128", "--precision", "fp16", "--out", str(tmp_path / "e")],
                         capture_output=True, text=True)
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr.strip().splitlines()[-1] == ("error: --precision fp16: not available for SAM 2 exports "
                                                    "(ONNX fp32 / int8, TorchScript exporter)")
    assert not (tmp_path / "e").exists()


def test_session_equals_sam2_image_predictor_at_1024(tmp_path, monkeypatch):
    """The issue's check: a 1024 px export, a 1024² and a non-square image, 16 prompts each (32 in all; every
    prompt kind of ``prompt_set`` on each). One fp32 export; each image is encoded once by sam2's predictor and
    once by the session. The merged model is exported as a plain one (its merge is checked at 128 px above),
    verified at export on ONNX Runtime only, as on a machine without openvino: OpenVINO's compile of Hiera at
    1024 px takes minutes on 2 cores and its parity is checked at 128 px above."""
    from peft_export.export import gates
    from peft_export.peft.adapters import AdaptedModel

    monkeypatch.setattr(gates, "verify_backends", lambda precision="fp32": ["onnxruntime"])
    adapted = lora_sam2(1024)
    model = merge_peft(adapted.model)
    manifest = export(AdaptedModel(model, None, adapted.base), tmp_path / "export")
    assert manifest["image_size"] == 1024
    session = SamSession(tmp_path / "export")
    for seed, (h, w) in enumerate([(1024, 1024), (600, 900)]):
        found = compare_with_predictor(session, model, smooth_image(h, w, seed), seed, n=16)
        print(f"1024 px export, {h} x {w} image: mask IoU {found['mask_iou']:.6f}, "
              f"logits max rel {found['logits_max_rel']:.2e}")
        assert found["mask_iou"] >= 0.99 and found["logits_max_rel"] <= 1e-3, found
