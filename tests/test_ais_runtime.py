"""Automatic instance segmentation without torch: micro-sam's post-processing (equal to torch-em's),
the exported instance decoder (parity, manifest), SamSession.segment_instances against the torch
pipeline, ``predict --instances`` and its bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.cli.main import app
from peft_export.data import synthetic_sample
from peft_export.errors import PeftExportError
from peft_export.evaluation import TorchPredictor, mean_segmentation_accuracy
from peft_export.export import merge_and_export
from peft_export.models import decoder_from_state
from peft_export.runtime import SamSession, instances_from_maps, object_records
from peft_export.runtime.instances import check_ais_params, require_ais_packages
from peft_export.training.instance_targets import distance_targets
from test_instance_decoder import micro_sam_decoder_state

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def noisy_maps(labels: np.ndarray, seed: int) -> np.ndarray:
    """What a trained decoder predicts, roughly: the targets, blurred, with noise."""
    from scipy import ndimage

    t = distance_targets(labels, 25)
    rng = np.random.default_rng(seed)
    return np.clip(ndimage.gaussian_filter(t, (0, 1.5, 1.5)) + rng.normal(0, 0.08, t.shape), 0, 1).astype(np.float32)


# ---- post-processing ---------------------------------------------------------------------------


def test_maps_of_the_labels_give_the_labels_back():
    for seed in range(3):
        _, labels = synthetic_sample(256, seed=seed)
        pred = instances_from_maps(*noisy_maps(labels, seed), min_size=25)
        assert pred.dtype == np.int32 and pred.shape == labels.shape
        assert sorted(np.unique(pred))[1:] == list(range(1, pred.max() + 1))
        gt = labels * (np.bincount(labels.ravel())[labels] >= 25)
        msa, sa = mean_segmentation_accuracy(pred, gt)
        assert sa[0.5] >= 0.9 and msa >= 0.6, (seed, msa, sa)


def test_post_processing_equals_torch_em():
    seg = pytest.importorskip("torch_em.util.segmentation", reason="torch-em is not installed")
    bic = pytest.importorskip("bioimage_cpp", reason="bioimage-cpp (torch-em's filters) is not installed")
    for seed in range(4):
        _, labels = synthetic_sample(256, seed=seed + 10)
        maps = noisy_maps(labels, seed)
        for params in ({}, {"min_size": 40, "center_distance_threshold": 0.4, "distance_smoothing": 2.0}):
            ours = instances_from_maps(*maps, **params)
            # micro-sam: foreground smoothed with bioimage-cpp's Gaussian, then torch-em's watershed.
            p = {"distance_smoothing": 1.6, **params}
            fg = bic.filters.gaussian_smoothing(maps[0], 1.0)
            theirs = seg.watershed_from_center_and_boundary_distances(maps[1], maps[2], fg, **p)
            np.testing.assert_array_equal(ours, theirs.astype(np.int64))


def test_targets_equal_torch_em():
    label_mod = pytest.importorskip("torch_em.transform.label", reason="torch-em is not installed")
    transform = label_mod.PerObjectDistanceTransform(distances=True, boundary_distances=True,
                                                     directed_distances=False, foreground=True, min_size=25)
    for seed in range(3):
        _, labels = synthetic_sample(200, seed=seed + 20)
        labels = labels.copy()
        labels[90:93, :] = 0  # cuts some objects in two: each piece is its own object
        np.testing.assert_allclose(distance_targets(labels, 25), transform(labels), atol=1e-6)


def test_records_and_parameters():
    labels = np.zeros((20, 30), np.int32)
    labels[2:5, 3:9] = 1
    labels[10:20, 20:30] = 2
    recs = object_records(labels)
    assert recs == [{"id": 1, "area": 18, "bbox": [3, 2, 5, 2], "centroid": [5.5, 3.0]},
                    {"id": 2, "area": 100, "bbox": [20, 10, 9, 9], "centroid": [24.5, 14.5]}]
    assert check_ais_params({"min_size": 5})["min_size"] == 5
    with pytest.raises(PeftExportError, match="unknown parameter 'center_thresh'"):
        check_ais_params({"center_thresh": 0.3})
    with pytest.raises(PeftExportError, match="distance_smoothing: must be >= 0"):
        check_ais_params({"distance_smoothing": -1})
    with pytest.raises(PeftExportError, match="min_size: must be a whole number"):
        check_ais_params({"min_size": 2.5})


def test_missing_scikit_image_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)
    with pytest.raises(PeftExportError, match=r"skimage is not installed; pip install 'peftexport\[ais\]'"):
        require_ais_packages()


# ---- exported instance decoder -----------------------------------------------------------------


def ais_adapted():
    """Tiny LoRA model at 128 with a micro-sam-layout decoder whose output layer is scaled, so the
    random maps leave 0.5 and the post-processing finds objects."""
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128)
    state = micro_sam_decoder_state(seed=8)
    state["out_conv.weight"] = state["out_conv.weight"] * 25
    adapted.instance_decoder = decoder_from_state(state)
    return adapted


@pytest.fixture(scope="module")
def ais_export(tmp_path_factory):
    torch.set_num_threads(1)
    adapted = ais_adapted()
    out = tmp_path_factory.mktemp("ais") / "export"
    manifest = merge_and_export(adapted, out, precisions=("fp32", "int8"), progress=False)
    return adapted, out, manifest


def nuclei_image(h: int = 150, w: int = 110) -> np.ndarray:
    image, _ = synthetic_sample(160, seed=31)
    return np.ascontiguousarray(image[:h, :w])  # 16-bit gray, portrait


def ais_maps_error(path: Path, decoder, image_size: int, seed: int = 4) -> tuple[float, float, float]:
    """The graph vs the torch decoder on a random embedding (recomputed here, not the manifest's verdict):
    max abs, mean abs, and the share of map pixels on the same side of 0.5."""
    from peft_export.export.verify import graph_runner

    emb = torch.randn(1, 256, image_size // 16, image_size // 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = decoder.eval()(emb).numpy()
    got = next(iter(graph_runner(path)({"image_embeddings": emb.numpy()}).values()))
    assert got.shape == want.shape and np.isfinite(got).all()
    diff = np.abs(got.astype(np.float64) - want)
    assert ((want > 0.5).mean() > 0.01) and ((want < 0.5).mean() > 0.01)  # maps on both sides of the threshold
    return float(diff.max()), float(diff.mean()), float(((got > 0.5) == (want > 0.5)).mean())


def test_export_writes_verified_ais_graphs(ais_export):
    adapted, out, manifest = ais_export
    graph = manifest["graphs"]["ais_decoder"]
    assert set(graph) == {"fp32"}  # no int8 AIS decoder (slower and inaccurate): int8 sessions use fp32
    assert ais_maps_error(out / graph["fp32"]["path"], adapted.instance_decoder, 128)[0] <= 1e-3
    assert "not exported" in manifest["instance_segmentation"]["precision_notes"]["int8"]
    assert graph["fp32"]["inputs"][0]["shape"] == [1, 256, 8, 8]
    assert graph["fp32"]["outputs"] == [{"name": "instance_maps", "shape": [1, 3, 128, 128], "dtype": "float32"}]
    ais = manifest["instance_segmentation"]
    assert ais["maps"] == ["foreground", "center_distances", "boundary_distances"]
    assert ais["postprocessing_defaults"]["distance_smoothing"] == 1.6
    assert (out / "ais_decoder.onnx").is_file() and not (out / "ais_decoder.int8.onnx").exists()
    assert json.loads((out / "manifest.json").read_text())["graphs"]["ais_decoder"]["fp32"]["sha256"]


def test_runtime_equals_the_torch_pipeline(ais_export):
    adapted, out, _ = ais_export
    image = nuclei_image()
    session = SamSession(out)
    labels, records = session.segment_instances(image)
    assert labels.dtype == np.int32 and labels.shape == image.shape
    assert len(records) == labels.max() >= 3
    assert sum(r["area"] for r in records) == int((labels > 0).sum())
    torch_pred = TorchPredictor(adapted.model, adapted.intensity, instance_decoder=adapted.instance_decoder)
    torch_pred.set_image(image)
    want, _ = torch_pred.segment_instances()
    msa, _ = mean_segmentation_accuracy(labels, want)
    assert msa >= 0.99
    maps = session.instance_maps(session.encode(image))
    assert maps.shape == (3,) + image.shape and maps.dtype == np.float32
    # Parameters change the result as documented: a large min_size removes the small objects.
    big = min(r["area"] for r in records) + 1
    fewer, recs2 = session.segment_instances(image, min_size=big)
    assert len(recs2) < len(records) and all(r["area"] >= big for r in recs2)


def int8_ais_session(out: Path) -> SamSession:
    """The int8 session of an export with an instance decoder: the int8 encoder, then the fp32 AIS graph (there
    is no int8 one; also SAM 2's test)."""
    session = SamSession(out, precision="int8")
    graphs = session.describe()["graphs"]
    assert graphs["encoder"]["precision"] == "int8"
    assert graphs["ais_decoder"] == {"precision": "fp32", "path": "ais_decoder.onnx", "bf16_mode": False}
    return session


def test_int8_session_runs_the_fp32_instance_decoder(ais_export):
    _, out, _ = ais_export
    session = int8_ais_session(out)
    image = nuclei_image()
    labels, _ = session.segment_instances(image)
    fp32, _ = SamSession(out).segment_instances(image)
    assert fp32.max() >= 5
    # The int8 encoder passed the export's gate (its embeddings decode prompt masks with IoU 0.99 on
    # average to fp32's): decoded by the same AIS decoder, its instance maps must stay within the
    # export's gate for a reduced-precision AIS decoder (fp16: maps mean abs <= 0.01; measured 0.008),
    # almost every pixel on the same side of 0.5 ...
    maps8 = session.instance_maps(session.encode(image))
    ref = SamSession(out)
    maps32 = ref.instance_maps(ref.encode(image))
    assert np.abs(maps8 - maps32).mean() <= 0.01
    assert ((maps8 > 0.5) == (maps32 > 0.5)).mean() >= 0.98
    # ... and the watershed finds the same objects but for at most one seed that moved (measured: 10 of
    # 11 objects matched at every IoU up to 0.8, one pair merged)
    msa, sa = mean_segmentation_accuracy(labels, fp32)
    assert abs(int(labels.max()) - int(fp32.max())) <= 1 and sa[0.5] >= 1 - 1.5 / fp32.max(), (msa, sa)


def check_predict_instances(out: Path, tmp_path: Path) -> np.ndarray:
    """``predict --instances`` on the nuclei image: labels, records and overlay written, options applied, and
    prompts refused beside --instances (nothing written); returns the labels (also SAM 2's test)."""
    tifffile.imwrite(tmp_path / "cells.tif", nuclei_image())
    res = CliRunner().invoke(app, ["predict", str(out), str(tmp_path / "cells.tif"), "--instances", "--overlay",
                                   "--min-size", "5", "-o", str(tmp_path / "pred"), "-q"])
    assert res.exit_code == 0, res.output
    labels = tifffile.imread(tmp_path / "pred" / "cells_labels.tif")
    rec = json.loads((tmp_path / "pred" / "cells_scores.json").read_text())
    assert rec["mode"] == "instances" and rec["n_objects"] == labels.max() >= 1
    assert rec["options"]["min_size"] == 5 and all(o["area"] >= 5 for o in rec["objects"])
    assert (tmp_path / "pred" / "cells_overlay.png").stat().st_size > 0
    assert f"{rec['n_objects']} objects" in res.output
    bad = CliRunner().invoke(app, ["predict", str(out), str(tmp_path / "cells.tif"), "--instances",
                                   "--points", "5,5", "-o", str(tmp_path / "p2")])
    assert bad.exit_code == 2 and "--instances: cannot be combined with --points/--box" in bad.output
    assert not (tmp_path / "p2").exists()
    return labels


def test_predict_instances_command(ais_export, tmp_path):
    check_predict_instances(ais_export[1], tmp_path)


def check_no_instance_decoder(export: Path, tmp_path: Path, hint: str = "") -> None:
    """An export without an instance decoder: the session and ``predict --instances`` say so in one line
    (``hint``: a pattern the session's message goes on with), nothing written (also SAM 2's test)."""
    session = SamSession(export)
    assert not session.has_instance_decoder
    with pytest.raises(PeftExportError, match="has no instance decoder" + hint):
        session.segment_instances(nuclei_image())
    tifffile.imwrite(tmp_path / "a.tif", nuclei_image())
    res = CliRunner().invoke(app, ["predict", str(export), str(tmp_path / "a.tif"), "--instances",
                                   "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "needs an instance decoder, and this export has none" in res.output
    assert not (tmp_path / "out").exists()


def test_an_export_without_decoder_is_refused(tmp_path_factory, tmp_path):
    from test_predict import real_export

    check_no_instance_decoder(real_export(tmp_path_factory), tmp_path)  # a LoRA model without instance decoder


def test_runtime_imports_no_post_processing_package(ais_export, tmp_path):
    """Without scipy and scikit-image the runtime still loads and prompts; AIS says what to install."""
    _, out, _ = ais_export
    script = r'''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "scipy", "skimage", "segment_anything"):
            raise ImportError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import numpy as np
from peft_export.errors import PeftExportError
from peft_export.runtime import SamSession
s = SamSession(sys.argv[1])
s.set_image(np.zeros((64, 80), np.uint8))
s.predict(box=np.array([5, 5, 40, 40]))
try:
    s.segment_instances()
except PeftExportError as e:
    print("ERROR", e)
print(sorted(m for m in ("torch", "scipy", "skimage") if m in sys.modules))
'''
    res = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ERROR instance segmentation: scipy is not installed; pip install 'peftexport[ais]'" in res.stdout
    assert res.stdout.strip().endswith("[]")


@pytest.mark.slow
def test_fp16_ais_decoder_passes_its_parity_check(tmp_path):
    """fp16 weights and convolutions with the norms in fp32 (dynamo exporter): maps within 0.01 on average."""
    from peft_export.export.ais import export_ais_decoder_onnx, verify_ais_decoder
    from peft_export.export.verify import build_reference
    from peft_export.models import random_sam

    decoder = decoder_from_state(micro_sam_decoder_state(seed=9))
    how = export_ais_decoder_onnx(decoder, tmp_path / "ais_decoder.fp16.onnx", 64, "fp16")
    assert how == "dynamo"
    import onnx

    graph = onnx.load(str(tmp_path / "ais_decoder.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    _, mean_abs, agree = ais_maps_error(tmp_path / "ais_decoder.fp16.onnx", decoder, 64)
    assert mean_abs <= 0.01 and agree > 0.95, (mean_abs, agree)
    parity = verify_ais_decoder(tmp_path / "ais_decoder.fp16.onnx", decoder, build_reference(random_sam("tiny", 64)),
                                "fp16")
    assert parity["passed"]  # and the export's own check agrees


def test_bench_times_the_ais_component(ais_export):
    """``bench --components ais``: the instance decoder + post-processing, torch and ONNX Runtime."""
    from peft_export.bench import run_bench

    adapted, out, _ = ais_export
    result = run_bench(export_dir=out, adapted=adapted, backends=("torch", "onnxruntime"), components=("ais",),
                       iterations=1, warmup=0, include_base=False, precisions=("fp32",))
    ok = {c["case"]: c for c in result["cases"] if c["status"] == "ok"}
    assert {"unmerged torch fp32", "merged torch fp32", "export onnxruntime-cpu fp32"} <= set(ok), result["cases"]
    for case in ok.values():
        s = case["components"]["ais"]
        assert set(case["components"]) == {"ais"}  # the component asked for, and only it
        assert s["n"] == len(s["times_ms"]) == 1 and s["min_ms"] <= s["median_ms"] <= s["max_ms"]
        assert s["median_ms"] == pytest.approx(np.median(s["times_ms"]), abs=1e-3)


def test_export_of_several_adapters_carries_each_instance_decoder(ais_export, tmp_path):
    """Shared-trunk exports: an adapter with an instance decoder gets its own ais_decoder graph,
    and its labels equal those of its single export; an adapter without one is refused clearly."""
    from peft_export.export import merge_and_export_adapters

    _, single, _ = ais_export
    plain = make_adapted(dict(method="lora", rank=4, targets=("q", "v"), blocks="late"), image_size=128)
    out = tmp_path / "multi"
    manifest = merge_and_export_adapters({"nuclei": ais_adapted(), "plain": plain}, out, progress=False)
    assert manifest["adapters"]["nuclei"]["ais_decoder"] == "ais_decoder_nuclei"
    assert "ais_decoder" not in manifest["adapters"]["plain"]
    assert ais_maps_error(out / manifest["graphs"]["ais_decoder_nuclei"]["fp32"]["path"],
                          ais_adapted().instance_decoder, 128)[0] <= 1e-3
    image = nuclei_image()
    session = SamSession(out)
    assert session.has_instance_decoder and session.ais_adapters == ("nuclei",)
    got, _ = session.segment_instances(image, adapter="nuclei")
    want, _ = SamSession(single).segment_instances(image)
    assert want.max() >= 3
    msa, _ = mean_segmentation_accuracy(got, want)
    assert msa >= 0.99, msa
    with pytest.raises(PeftExportError, match="adapter plain has no instance decoder"):
        session.segment_instances(image, adapter="plain")
    with pytest.raises(PeftExportError, match="nuclei, plain"):  # two adapters: which one must be said
        session.segment_instances(image)
