"""The bf16 precision: an export's fp32 graphs run in OpenVINO's bf16 mode on CPUs with native bfloat16
(AVX512_BF16 or AMX), verified at export like int8 (the same per-prompt gate; the AIS decoder's maps within
the fp16 limit and on the same side of 0.5), and chosen at run time with ``--backend openvino --precision
bf16``. On a CPU without native bfloat16 the export refuses it before any work: both answers are tested,
whichever this host gives.
"""

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

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.errors import PeftExportError
from peft_export.export import merge_and_export, merge_and_export_adapters
from peft_export.runtime import SamSession
from peft_export.runtime.backends.ov import native_bf16
from test_ais_runtime import ais_adapted, nuclei_image

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'peftexport[openvino]')")
pytestmark = pytest.mark.slow  # exports

ROOT = Path(__file__).resolve().parents[1]
NO_BF16 = native_bf16()  # None: this CPU runs bf16 natively
needs_bf16 = pytest.mark.skipif(NO_BF16 is not None, reason=f"this CPU cannot run bf16: {NO_BF16}")


def box_mask_ious(session: SamSession, ref: SamSession, image: np.ndarray, boxes) -> list[float]:
    """IoU of ``session``'s single box masks with ``ref``'s on ``image`` (each box must give ``ref`` a mask)."""
    session.set_image(image)
    ref.set_image(image)
    ious = []
    for box in boxes:
        a, _, _ = session.predict(box=np.asarray(box, np.float32), multimask_output=False)
        b, _, _ = ref.predict(box=np.asarray(box, np.float32), multimask_output=False)
        assert b.sum() > 0
        ious.append((a & b).sum() / max(1, (a | b).sum()))
    return ious


@pytest.fixture(scope="module")
def bf16_export(tmp_path_factory):
    if NO_BF16 is not None:
        pytest.skip(f"this CPU cannot run bf16: {NO_BF16}")
    torch.set_num_threads(1)
    adapted = ais_adapted()
    out = tmp_path_factory.mktemp("bf16") / "export"
    return adapted, out, merge_and_export(adapted, out, precisions=("fp32", "bf16"), progress=False)


@pytest.mark.skipif(NO_BF16 is None, reason="this CPU runs bf16 natively (the other branch is tested)")
def test_without_native_bf16_the_export_refuses_it_before_any_work(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(PeftExportError, match=r"^--precision bf16: cannot be verified on this machine: "):
        merge_and_export(make_adapted(MERGEABLE_CONFIGS["lora"]), out, precisions=("fp32", "bf16"), progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@needs_bf16
def test_bf16_entries_name_the_fp32_files_and_record_the_gate(bf16_export):
    _, out, manifest = bf16_export
    assert manifest["refused"] == []
    for graph in ("encoder", "ais_decoder"):
        fp32, bf16 = manifest["graphs"][graph]["fp32"], manifest["graphs"][graph]["bf16"]
        assert bf16["path"] == fp32["path"] and bf16["sha256"] == fp32["sha256"]  # no file of its own
        assert bf16["verified_on"] == ["openvino-bf16"]
        assert bf16["parity"]["passed"]
    enc = manifest["graphs"]["encoder"]["bf16"]["parity"]
    assert enc["prompt_agreement"]["prompts"] == 32 and enc["prompt_mask_iou_min"] >= 0.97
    # bf16 really ran: the embeddings are not fp32's up to float rounding (fp32's own check allows 1e-4)
    assert enc["embeddings_max_rel"] > 1e-3, enc["embeddings_max_rel"]
    ais = manifest["graphs"]["ais_decoder"]["bf16"]["parity"]
    assert ais["maps_mean_abs"] <= 0.01 and ais["maps_threshold_agreement"] >= 0.98
    # only the graphs asked for: the decoders stay fp32, and no bf16 file exists
    assert all(set(v) == {"fp32"} for k, v in manifest["graphs"].items() if k not in ("encoder", "ais_decoder"))
    assert not list(out.glob("*bf16*"))


@needs_bf16
def test_bf16_session_runs_bf16_where_verified_and_agrees_with_fp32(bf16_export):
    _, out, _ = bf16_export
    session = SamSession(out, backend="openvino", precision="bf16")
    graphs = session.describe()["graphs"]
    assert graphs["encoder"]["precision"] == "bf16" and graphs["ais_decoder"]["precision"] == "bf16"
    assert {graphs[k]["precision"] for k in graphs if k not in ("encoder", "ais_decoder")} == {"fp32"}
    ref = SamSession(out, backend="openvino")
    image = nuclei_image()
    emb16, emb32 = session.encode(image).embedding, ref.encode(image).embedding
    rel = np.abs(emb16 - emb32).max() / np.abs(emb32).max()
    assert 1e-3 < rel < 0.05, rel  # bf16 arithmetic, close to fp32
    ious = box_mask_ious(session, ref, image, [[10, 12, 60, 70], [40, 30, 100, 120], [5, 80, 90, 140], [20, 20, 105, 145]])
    assert np.mean(ious) >= 0.97, ious
    maps16, maps32 = session.instance_maps(session.encode(image)), ref.instance_maps(ref.encode(image))
    assert np.abs(maps16 - maps32).mean() <= 0.01 and ((maps16 > 0.5) == (maps32 > 0.5)).mean() >= 0.98


def test_bf16_is_refused_where_it_cannot_run(tmp_path):
    out = tmp_path / "export"
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"])
    with pytest.raises(PeftExportError, match=r"^--precision bf16: bf16 runs the fp32 graphs .*add fp32"):
        merge_and_export(adapted, out, precisions=("bf16",), progress=False)
    with pytest.raises(PeftExportError, match=r"^--precision bf16: not available for several adapters"):
        merge_and_export_adapters({"a": adapted, "b": make_adapted(MERGEABLE_CONFIGS["lora"], seed=1)}, out,
                                  precisions=("fp32", "bf16"), progress=False)
    assert not out.exists()
    merge_and_export(adapted, out, progress=False)
    with pytest.raises(PeftExportError, match=r"^precision bf16: runs on the openvino backend only .* not on onnxruntime"):
        SamSession(out, precision="bf16")
    with pytest.raises(PeftExportError, match=r"no bf16 encoder"):
        SamSession(out, backend="openvino", precision="bf16")
    # the command line: one error line, exit 2, nothing written
    image = tmp_path / "img.tif"
    tifffile.imwrite(image, nuclei_image())
    proc = subprocess.run([sys.executable, "-m", "peft_export.cli", "predict", str(out), str(image), "--box",
                           "10,10,60,60", "--precision", "bf16", "-o", str(tmp_path / "pred")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: precision bf16: runs on the openvino backend only")
    assert not (tmp_path / "pred").exists()
    assert json.loads((out / "manifest.json").read_text())["graphs"]["encoder"].keys() == {"fp32"}


def test_native_bf16_follows_the_cpu_flags():
    """OpenVINO's answer agrees with the kernel's: bf16 natively where the CPU has AVX512_BF16 or AMX-BF16 (or,
    on recent Intel client CPUs, AVX-NE-CONVERT, which OpenVINO also counts)."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo on this system (the check reads the kernel's CPU flags)")
    assert (NO_BF16 is None) == bool({"avx512_bf16", "amx_bf16", "avx_ne_convert"} & set(flags)), NO_BF16


@needs_bf16
def test_sam2_bf16_export_and_session(tmp_path):
    pytest.importorskip("sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")
    from test_sam2_export import export, lora_sam2, smooth_image

    out = tmp_path / "export"
    manifest = export(lora_sam2(128), out, ("fp32", "bf16"))
    bf16 = manifest["graphs"]["encoder"]["bf16"]
    assert bf16["path"] == "encoder.onnx" and bf16["verified_on"] == ["openvino-bf16"]
    assert bf16["parity"]["prompt_mask_iou_min"] >= 0.97 and bf16["parity"]["embeddings_max_rel"] > 1e-3
    session, ref = SamSession(out, backend="openvino", precision="bf16"), SamSession(out, backend="openvino")
    assert session.describe()["graphs"]["encoder"]["precision"] == "bf16"
    assert session.describe()["graphs"]["decoder"]["precision"] == "fp32"
    ious = box_mask_ious(session, ref, smooth_image(96, 128, seed=3), [[8, 8, 60, 50], [30, 20, 120, 90], [0, 40, 70, 95]])
    assert np.mean(ious) >= 0.97, ious


def test_bench_times_bf16_on_openvino_only_and_says_why_not_elsewhere():
    from peft_export.bench.cases import Availability, plan_cases

    able = Availability(cuda=False, onnxruntime=True, ort_providers=("CPUExecutionProvider",), openvino=True,
                        openvino_bf16="")
    run, _ = plan_cases(["onnxruntime", "openvino"], "cpu", None, able, export_precisions=["fp32", "bf16"])
    assert {(c.backend, c.precision) for c in run} == {("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")}
    unable = Availability(cuda=False, onnxruntime=True, ort_providers=("CPUExecutionProvider",), openvino=True,
                          openvino_bf16="this CPU has no native bfloat16 arithmetic")
    run, skipped = plan_cases(["openvino"], "cpu", ["bf16"], unable, export_precisions=["fp32", "bf16"])
    assert run == [] and [s["reason"] for s in skipped] == ["this CPU has no native bfloat16 arithmetic"]


@needs_bf16
def test_predict_3d_runs_bf16_on_openvino_from_the_command_line(bf16_export, tmp_path):
    """``predict --backend openvino --precision bf16`` (new: predict chose no backend before) through automatic
    3D: the same volume as in fp32 on ONNX Runtime, about the same objects."""
    from peft_export.data.synthetic_volume import synthetic_volume

    _, out, _ = bf16_export
    volume, _ = synthetic_volume((4, 128, 128), seed=3)
    tifffile.imwrite(tmp_path / "vol.tif", volume)
    labels = {}
    for backend, precision in (("onnxruntime", "fp32"), ("openvino", "bf16")):
        dst = tmp_path / f"labels_{precision}.tif"
        proc = subprocess.run([sys.executable, "-m", "peft_export.cli", "predict", str(out), str(tmp_path / "vol.tif"),
                               "--instances", "--3d", "--axes", "zyx", "-o", str(dst), "--backend", backend,
                               "--precision", precision, "-q"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        labels[precision] = tifffile.imread(dst)
    assert labels["bf16"].shape == labels["fp32"].shape == volume.shape[:3]
    n16, n32 = len(np.unique(labels["bf16"])) - 1, len(np.unique(labels["fp32"])) - 1
    assert n32 >= 3 and abs(n16 - n32) <= max(2, n32 // 4), (n16, n32)
    agree = ((labels["bf16"] > 0) == (labels["fp32"] > 0)).mean()
    assert agree >= 0.97, agree


@needs_bf16
def test_int8_verified_in_bf16_mode_runs_that_way_on_openvino(tiny_lora_128_export, tmp_path):
    """An int8 encoder also passes the int8 gate in OpenVINO's bf16 mode (its int8 layers as they are, attention
    and the rest in bf16): ``verified_on`` names it, and the openvino backend then compiles it so; an int8 entry
    without that check (an export made on a CPU without native bf16) runs in f32 mode."""
    import shutil

    out, manifest = tiny_lora_128_export
    entry = manifest["graphs"]["encoder"]["int8"]
    assert entry["verified_on"] == ["onnxruntime", "openvino", "openvino-bf16"]
    gate = entry["parity_by_backend"]["openvino-bf16"]
    assert gate["passed"] and gate["prompt_mask_iou_mean"] >= 0.99 and gate["prompt_mask_iou_min"] >= 0.97
    assert manifest["graphs"]["encoder"]["fp32"]["verified_on"] == ["onnxruntime", "openvino"]  # fp32 stays exact
    session = SamSession(out, backend="openvino", precision="int8")
    graphs = session.describe()["graphs"]
    assert graphs["encoder"]["bf16_mode"] and not any(g["bf16_mode"] for k, g in graphs.items() if k != "encoder")
    # the same files with the check taken out of the manifest: f32 mode
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    on_disk = json.loads((plain / "manifest.json").read_text())
    on_disk["graphs"]["encoder"]["int8"]["verified_on"] = ["onnxruntime", "openvino"]
    (plain / "manifest.json").write_text(json.dumps(on_disk))
    f32 = SamSession(plain, backend="openvino", precision="int8")
    assert not f32.describe()["graphs"]["encoder"]["bf16_mode"]
    assert not SamSession(out, backend="onnxruntime", precision="int8").describe()["graphs"]["encoder"]["bf16_mode"]
    image = nuclei_image()[:128, :128]
    e16, e32 = session.encode(image).embedding, f32.encode(image).embedding
    rel = np.abs(e16 - e32).max() / np.abs(e32).max()
    assert 1e-3 < rel < 0.1, rel  # bf16 arithmetic really ran, close to the f32 mode's
    ious = box_mask_ious(session, f32, image, [[10, 12, 60, 70], [40, 30, 100, 120], [5, 60, 90, 125]])
    assert np.mean(ious) >= 0.97, ious
