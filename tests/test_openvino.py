"""The OpenVINO backend against ONNX Runtime on the same export: session, bench, evaluate, export checks.

Skipped when the openvino package is absent (pip install 'peftexport[openvino]'; the dev extra has it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from peft_export.cli.main import app
from peft_export.errors import PeftExportError
from peft_export.runtime import SamSession

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

pytest.importorskip("openvino", reason="the openvino package is not installed (pip install 'peftexport[openvino]')")

runner = CliRunner()


@pytest.fixture(scope="module")
def export(tiny_lora_128_export):
    """The tiny LoRA model (128 px) exported fp32 + int8 by merge_and_export (conftest.py: one per session)."""
    return tiny_lora_128_export


def _image(seed=0):
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (6, 8, 3))
    return np.clip(np.kron(low, np.ones((16, 16, 1))) + rng.normal(0, 10, (96, 128, 3)), 0, 255).astype(np.uint8)


def test_every_graph_was_verified_on_openvino_too(export):
    from peft_export.runtime.backends.ov import native_bf16

    _, manifest = export
    for graph, variants in manifest["graphs"].items():
        for precision, entry in variants.items():
            # int8 also in OpenVINO's bf16 mode where the CPU has native bfloat16 (test_bf16)
            bf16_mode = ["openvino-bf16"] if precision == "int8" and native_bf16() is None else []
            assert entry["verified_on"] == ["onnxruntime", "openvino", *bf16_mode], (graph, precision)
            ov = entry["parity_by_backend"]["openvino"]  # judged by the same limits (what OpenVINO computes:
            assert ov["thresholds"] == entry["parity"]["thresholds"]  # test_openvino_session_matches_onnxruntime)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_openvino_session_matches_onnxruntime(export, precision):
    out, _ = export
    ort_s = SamSession(out, "onnxruntime", "cpu", precision)
    ov_s = SamSession(out, "openvino", "cpu", precision)
    assert ov_s.describe()["backend"] == "openvino" and ov_s.providers[0].startswith("OpenVINO")
    image = _image()
    for s in (ort_s, ov_s):
        s.set_image(image)
    a, b = ort_s.get_image_embedding(), ov_s.get_image_embedding()
    tol = 1e-4 if precision == "fp32" else 0.05  # int8: both quantise activations at run time, slightly differently
    assert np.abs(a - b).max() <= tol * np.abs(a).max()
    for kw in (dict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1])), dict(box=[20, 10, 90, 70])):
        ma, sa, _ = ort_s.predict(**kw)
        mb, sb, _ = ov_s.predict(**kw)
        inter, union = np.logical_and(ma, mb).sum(), np.logical_or(ma, mb).sum()
        assert union == 0 or inter / union >= (0.999 if precision == "fp32" else 0.95)
        assert np.abs(sa - sb).max() < (1e-3 if precision == "fp32" else 0.05)
    boxes = np.array([[10, 10, 50, 60], [40, 20, 120, 90]], np.float32)
    la = ort_s.predict_batch(boxes=boxes, return_logits=True)[2]
    lb = ov_s.predict_batch(boxes=boxes, return_logits=True)[2]
    assert la.shape == lb.shape == (2, 1, 32, 32)
    if precision == "fp32":
        assert np.abs(la - lb).max() <= 1e-3 * max(1.0, np.abs(la).max())


def test_openvino_is_cpu_only_here(export):
    out, _ = export
    with pytest.raises(PeftExportError, match="backend openvino: runs on device='cpu' only"):
        SamSession(out, "openvino", "cuda")


@pytest.mark.slow  # worker processes / full exports
def test_bench_and_evaluate_run_on_openvino(export, tmp_path):
    out, _ = export
    res = runner.invoke(app, ["bench", str(out), "--backend", "onnxruntime,openvino", "--components",
                              "encoder,decoder_box,end_to_end", "--iterations", "1", "--precision", "fp32",
                              "-o", str(tmp_path / "b"), "-q"])
    assert res.exit_code == 0, res.output
    cases = {c["case"]: c for c in json.loads((tmp_path / "b" / "bench.json").read_text())["cases"]}
    ov = cases["export openvino-cpu fp32"]
    assert ov["status"] == "ok" and set(ov["components"]) == {"encoder", "decoder_box", "end_to_end"}
    assert ov["process"]["torch_imported"] is False

    from peft_export.data import make_demo_data

    make_demo_data(tmp_path / "data", n_images=1, size=128, seed=1, n_objects=(2, 3))
    res = runner.invoke(app, ["evaluate", f"ov={out}@fp32", "--backend", "openvino", "--data", str(tmp_path / "data"),
                              "--iterations", "1", "--max-objects", "2", "-o", str(tmp_path / "e"), "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert report["models"]["ov"]["backend"] == "openvino"
    assert 0.0 <= report["rows"][0]["dice_box"] <= 1.0


def test_a_signal_after_openvino_does_not_crash(export):
    """Each OpenVINO compile installs an alternate signal stack on the calling thread and its core
    puts back the one it found when it goes; two sessions released in creation order left the
    thread on a freed stack, and the next signal (Ctrl-C in a training run after an export verified
    on OpenVINO: the test suite's crash) killed the process with SIGSEGV. The backend puts the
    thread's own stack back after each compile."""
    out, _ = export
    code = (
        "import gc, signal, sys\n"
        "from peft_export.runtime import SamSession\n"
        f"first, second = SamSession({str(out)!r}, 'openvino'), SamSession({str(out)!r}, 'openvino')\n"
        "del first; gc.collect()\n"  # not in the reverse order of creation: what left a freed stack
        "del second; gc.collect()\n"
        "signal.signal(signal.SIGINT, lambda *a: print('handled', flush=True))\n"
        "signal.raise_signal(signal.SIGINT)\n"
        "print('went on', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.splitlines() == ["handled", "went on"]
