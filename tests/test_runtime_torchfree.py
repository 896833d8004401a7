"""The runtime without torch: blocked imports, a bare virtual environment (numpy + onnxruntime),
threads sharing one session, and memory over a long set_image/predict loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from peft_export.runtime import SamSession
from peft_export.bench.stats import current_rss_mb
from helpers import import_blocker
from test_predict import real_export

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "segment_anything", "onnx", "scipy")

# Runs in a subprocess: with "--block", importing any of BLOCKED raises ImportError.
SCRIPT = import_blocker(BLOCKED, when="'--block' in sys.argv") + r'''
import importlib.util, json, sys
import numpy as np
from peft_export.runtime import SamSession
from peft_export.predict.overlay import render_overlay, save_png

export_dir, out = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:137, 0:200]
image = (3000 + 20000 * ((yy - 60) ** 2 + (xx - 120) ** 2 < 30 ** 2) + rng.normal(0, 500, (137, 200))).astype(np.uint16)
sess = SamSession(export_dir)
sess.set_image(image)
m1, iou1, low1 = sess.predict(point_coords=np.array([[120.0, 60.0], [10.0, 10.0]]), point_labels=np.array([1, 0]))
m2, iou2, _ = sess.predict(box=np.array([80.0, 20.0, 160.0, 100.0]), mask_input=low1[:1], multimask_output=False)
mb, ioub, _ = sess.predict_batch(boxes=np.array([[80.0, 20.0, 160.0, 100.0], [0, 0, 50, 50]]))
emb = sess.encode(image[::-1])
labels, records = sess.segment_everything(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.6,
                                          embedding=emb)
pic = render_overlay(image, masks=m1[:1], points=[[120, 60], [10, 10]], point_labels=[1, 0])
save_png(pic, out + ".png")
try:
    torch_importable = importlib.util.find_spec("torch") is not None
except ImportError:
    torch_importable = False
result = {
    "iou1": iou1.tolist(), "area1": m1.sum(axis=(1, 2)).tolist(), "iou2": iou2.tolist(), "area2": int(m2.sum()),
    "ioub": ioub.tolist(), "areab": mb.sum(axis=(1, 2, 3)).tolist(), "n_objects": len(records),
    "labels_sum": int(labels.sum()), "loaded": sorted(m for m in BLOCKED if m in sys.modules),
    "torch_importable": torch_importable, "pillow": importlib.util.find_spec("PIL") is not None,
}
with open(out, "w") as f:
    json.dump(result, f)
'''


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return real_export(tmp_path_factory)


def _run_script(python: str, export: Path, out: Path, *flags: str, env: dict | None = None) -> dict:
    res = subprocess.run([python, "-c", SCRIPT, str(export), str(out), *flags], capture_output=True, text=True,
                         env=env or {**os.environ, "PYTHONPATH": str(ROOT)}, cwd=out.parent, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def _expected(export: Path, tmp_path: Path) -> dict:
    """The same script in this (torch-enabled) interpreter's environment, imports not blocked."""
    return _run_script(sys.executable, export, tmp_path / "expected.json")


def test_session_end_to_end_with_torch_blocked(export, tmp_path):
    got = _run_script(sys.executable, export, tmp_path / "blocked.json", "--block")
    assert got["loaded"] == [] and got["torch_importable"] is False
    want = _expected(export, tmp_path)
    assert want["torch_importable"] is True
    for key in ("iou1", "iou2", "ioub"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)
    for key in ("area1", "area2", "areab", "n_objects", "labels_sum"):
        assert got[key] == want[key]
    assert got["n_objects"] >= 1 and (tmp_path / "blocked.json.png").stat().st_size > 0


@pytest.mark.slow
def test_session_in_a_bare_venv(export, tmp_path):
    """A fresh venv with only numpy + onnxruntime (from PyPI) runs the runtime; torch is absent there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    try:
        pip = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "--timeout", "30",
                              "--retries", "1", "numpy", "onnxruntime"], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("pip install numpy onnxruntime timed out (package registry unreachable?)")
    if pip.returncode != 0:
        text = pip.stdout + pip.stderr
        if any(s in text for s in ("No matching distribution", "Could not find a version", "connection", "Connection",
                                   "NewConnectionError", "Temporary failure", "timed out")):
            pytest.skip(f"pip cannot install numpy + onnxruntime: {text.strip().splitlines()[-1]}")
        raise AssertionError(text[-3000:])
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    got = _run_script(python, export, tmp_path / "venv.json", env=env)
    check = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert check.returncode != 0 and "No module named 'torch'" in check.stderr
    assert got["torch_importable"] is False and got["loaded"] == [] and got["pillow"] is False
    want = _expected(export, tmp_path)
    # Another onnxruntime/numpy build: scores agree closely, masks nearly pixel for pixel.
    for key in ("iou1", "iou2", "ioub"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-3)
    for key in ("area1", "areab"):
        np.testing.assert_allclose(got[key], want[key], rtol=0.01, atol=5)
    assert (tmp_path / "venv.json.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the zlib PNG writer


# ---- threads and memory ---------------------------------------------------------------------


PROMPTS = [
    dict(point_coords=np.array([[120.0, 60.0]]), point_labels=np.array([1])),
    dict(point_coords=np.array([[30.0, 40.0], [150.0, 100.0]]), point_labels=np.array([1, 0])),
    dict(box=np.array([60.0, 25.0, 170.0, 120.0])),
    dict(point_coords=np.array([[118.0, 64.0]]), point_labels=np.array([1]), box=np.array([50, 20, 180, 130])),
]


def _images():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (137, 200, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:137, 0:200]
    b = (1000 + 30000 * (((yy - 70) ** 2 + (xx - 90) ** 2) < 40**2) + rng.normal(0, 300, (137, 200))).astype(np.uint16)
    return a, b


def _concurrently(fn, n: int = 4, repeats: int = 5) -> dict:
    results, errors = {}, []
    barrier = threading.Barrier(n)

    def work(i):
        try:
            barrier.wait()
            for _ in range(repeats):
                results[i] = fn(i)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_threads_share_one_session(export):
    sess = SamSession(export)
    a, b = _images()
    sess.set_image(a)
    sequential = [sess.predict(**p) for p in PROMPTS]
    got = _concurrently(lambda i: sess.predict(**PROMPTS[i]))
    for i, (masks, iou, low) in got.items():
        np.testing.assert_array_equal(masks, sequential[i][0])
        np.testing.assert_array_equal(iou, sequential[i][1])
        np.testing.assert_array_equal(low, sequential[i][2])
    # Two images at once: each thread passes its own embedding.
    embs = [sess.encode(a), sess.encode(b)]
    sequential = [sess.predict(**PROMPTS[i], embedding=embs[i % 2]) for i in range(4)]
    got = _concurrently(lambda i: sess.predict(**PROMPTS[i], embedding=embs[i % 2]))
    for i in range(4):
        np.testing.assert_array_equal(got[i][0], sequential[i][0])
        np.testing.assert_array_equal(got[i][1], sequential[i][1])
    # Encoder and decoder at the same time: two threads encode and predict, two run predict_batch.
    boxes = np.array([[60.0, 25.0, 170.0, 120.0], [0, 0, 80, 60]])
    batch = sess.predict_batch(boxes=boxes, embedding=embs[1])

    def mixed(i):
        if i < 2:
            return sess.predict(**PROMPTS[i], embedding=sess.encode((a, b)[i]))
        return sess.predict_batch(boxes=boxes, embedding=embs[1])

    got = _concurrently(mixed, repeats=2)
    for i in (0, 1):
        np.testing.assert_array_equal(got[i][0], sequential[i][0])
        np.testing.assert_allclose(got[i][1], sequential[i][1], atol=1e-6)
    for i in (2, 3):
        np.testing.assert_array_equal(got[i][0], batch[0])


def test_long_set_image_predict_loop_does_not_grow_memory(export):
    sess = SamSession(export)
    a, b = _images()
    rng = np.random.default_rng(8)

    def step(k):
        sess.set_image(a if k % 2 else b)
        x, y = rng.uniform(5, 130, 2)
        sess.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]))
        sess.predict(box=np.array([10.0, 10.0, 150.0, 120.0]), multimask_output=False)

    for k in range(8):  # warm-up: ONNX Runtime allocates its buffers on the first runs
        step(k)
    start = current_rss_mb()
    for k in range(50):
        step(k)
    growth = current_rss_mb() - start
    assert growth < 50, f"RSS grew by {growth:.1f} MB over 50 set_image/predict iterations"
