"""The napari plugin without torch: the whole plugin (widget, sample data, a click, Segment all,
save, Segment all (3D) on a stack, the Improve widget saying it needs torch) runs in a process where importing torch fails, on the [napari] extra's Qt binding (PyQt6,
without napari's PyQt5 deprecation warning), and ``pip install ".[napari]"`` resolves to no
torch, torchvision or NVIDIA package, and to PyQt6 rather than PyQt5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("napari", reason="napari is not installed (pip install '.[napari]')")

from helpers import import_blocker  # noqa: E402
from test_napari import build_ais_export, headless_display  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "segment_anything", "onnx")

# Runs in a subprocess: importing any of BLOCKED raises ImportError (scipy stays: the [ais] extra has it).
SCRIPT = import_blocker(HEAVY) + r'''
import importlib.util, json, sys, time
import numpy as np
import napari
import qtpy
from qtpy.QtWidgets import QApplication

export_dir, out = sys.argv[1], sys.argv[2]
viewer = napari.Viewer(show=True)  # napari warns about a deprecated binding when its window shows
viewer.open_sample("peftexport", "synthetic_nuclei")
_, widget = viewer.window.add_plugin_dock_widget("peftexport", "Segment with an export")
app = QApplication.instance()

def settle():
    end = time.time() + 120
    while len(widget.tasks) and time.time() < end:
        app.processEvents()
        time.sleep(0.01)
    app.processEvents()

widget.load_export(export_dir)
settle()
viewer.layers["point prompts"].add([128.0, 128.0])
settle()
area = int(viewer.layers["current object"].data.sum())
committed = widget.commit()
widget.segment_all()
settle()
widget.save(out + ".tif")
settle()
saved = widget.status.text().rsplit(" to ", 1)[-1] if widget.status.text().startswith("saved ") else None
status = widget.status.text()
# A z-stack: every plane embedded, then Segment all (3D) (the multicut of bioimage-cpp), torch-free too.
viewer.add_image(np.stack([viewer.layers["synthetic nuclei"].data[:128, :128]] * 3), name="stack")
widget.image_box.setCurrentText("stack")
widget.segment_all_3d()
settle()
# "Improve the model" opens, and says that it needs the [torch] extra (blocked here).
_, improve = viewer.window.add_plugin_dock_widget("peftexport", "Improve the model")
improve_said, improve_enabled = improve.status.text(), improve.improve_button.isEnabled()
improve.improve()
result = {
    "qt": qtpy.API_NAME, "status": status, "status_3d": widget.status.text(), "area": area, "committed": committed, "saved": saved,
    "automatic_max": int(viewer.layers["synthetic nuclei automatic"].data.max()),
    "automatic_3d_max": int(viewer.layers["stack automatic 3D"].data.max()),
    "improve_said": improve_said, "improve_enabled": improve_enabled, "improve_pressed": improve.status.text(),
    "loaded": sorted(m for m in BLOCKED if m in sys.modules),
    "plugin_modules": sorted(m for m in sys.modules if m.startswith("peft_export.napari")),
}
viewer.close()
with open(out, "w") as f:
    json.dump(result, f)
'''


@pytest.mark.slow  # a napari process of its own (and the tiny export, if no other test made it)
def test_plugin_runs_with_torch_blocked(tmp_path, tmp_path_factory):
    export = build_ais_export(tmp_path_factory)
    out = tmp_path / "result.json"
    env = {**os.environ, **headless_display(), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(export), str(out)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["loaded"] == [], got["loaded"]
    assert got["qt"] == "PyQt6", f"napari ran on {got['qt']} (an environment from the old extra: pip uninstall pyqt5)"
    assert "PyQt5 backend is deprecated" not in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]
    assert got["area"] > 0 and got["committed"] == 1 and got["automatic_max"] >= 1, got
    assert got["automatic_3d_max"] >= 1 and got["status_3d"].endswith("objects in 3D"), got
    assert got["improve_said"].startswith("error: Improve the model trains in a separate process and needs the "
                                          "[torch] extra (torch, segment_anything, onnx missing here): "
                                          "pip install 'peftexport[torch]'."), got["improve_said"]
    assert not got["improve_enabled"] and got["improve_pressed"] == got["improve_said"]
    assert got["saved"] == str(tmp_path / "result.json.tif") and Path(got["saved"]).is_file()
    for name in ("widget", "prompts", "worker", "automatic", "save", "sample", "layers", "images", "current",
                 "pyramid", "results", "volume", "improve", "improve_data"):
        assert f"peft_export.napari.{name}" in got["plugin_modules"]


@pytest.mark.slow
def test_pip_install_napari_extra_adds_no_torch(tmp_path):
    """pip resolves ``.[napari]`` from scratch (--ignore-installed), without installing: no torch side."""
    report = tmp_path / "report.json"
    try:
        res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                              "--disable-pip-version-check", "--report", str(report), f"{ROOT}[napari]"],
                             capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not resolve .[napari] in 10 minutes (package registry unreachable?)")
    if res.returncode != 0:
        text = res.stdout + res.stderr
        if not os.environ.get("CI") and any(s in text for s in ("No matching distribution", "Could not find a version",
                                                                  "NewConnectionError", "Temporary failure")):
            pytest.skip(f"pip cannot reach the package registry: {text.strip().splitlines()[-1]}")
        raise AssertionError(text[-3000:])
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    heavy = sorted(n for n in names if n in ("torch", "torchvision", "segment-anything", "onnx", "triton")
                   or n.startswith("nvidia-"))
    assert not heavy, f'pip install ".[napari]" would install {heavy}'
    for wanted in ("napari", "onnxruntime", "pyqt6", "magicgui", "scikit-image", "bioimage-cpp", "laptrack", "peftexport"):
        assert wanted in names, f"{wanted} missing from the resolution: {sorted(names)}"
    assert "pyqt5" not in names, "napari 0.9 deprecates PyQt5: the extra installs PyQt6"
