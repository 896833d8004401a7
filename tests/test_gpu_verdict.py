"""gpu_check.sh's verdict (benchmarks/gpu_verdict.py) on real pytest runs, and gpu_bench.py's report of
a failed training run: what runs without a GPU of the GPU check's reporting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_verdict import NOT_RUN, pytest_verdict  # noqa: E402

TESTS = '''
import pytest

@pytest.mark.gpu
def test_runs():
    assert True

@pytest.mark.gpu
def test_needs_trt():
    pytest.skip("tensorrt is not importable (not installable on these machines)")

@pytest.mark.gpu
def test_breaks():
    assert {broken}
'''


def _pytest(tmp_path: Path, marks: str, broken: bool = False, skip: bool = True,
            plugins: bool = False) -> tuple[int, str]:
    """A real pytest run, as gpu_check.sh runs it (-m MARKS -q -rs), on a small test file.

    Without ``plugins`` the installed pytest plugins are not loaded (PYTEST_DISABLE_PLUGIN_AUTOLOAD):
    napari's plugin alone imports napari (~15 s a run on 2 busy cores, for a file of three asserts). One
    run below keeps them, so the verdict also reads the summary the real environment prints (its
    warnings included)."""
    import os

    body = TESTS.format(broken="False" if broken else "True")
    if not skip:
        body = body.replace('pytest.skip("tensorrt', 'str("tensorrt')
    (tmp_path / "test_probe.py").write_text(body)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: probe\n")
    env = dict(os.environ)
    if not plugins:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    res = subprocess.run([sys.executable, "-m", "pytest", "-m", marks, "-q", "-rs", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env)
    (tmp_path / "out.txt").write_text(res.stdout + res.stderr)
    return res.returncode, res.stdout + res.stderr


@pytest.mark.slow  # five pytest processes and two of gpu_verdict.py
def test_verdicts_on_real_pytest_runs(tmp_path):
    # every selected test ran and passed
    rc, out = _pytest(tmp_path, "gpu", skip=False, plugins=True)
    assert rc == 0 and pytest_verdict(rc, out) == (0, "pytest: ok (3 passed)")
    # one selected test skipped for a missing package: NOT RUN, naming why, never "ok"
    rc, out = _pytest(tmp_path, "gpu", skip=True)
    assert rc == 0
    status, line = pytest_verdict(rc, out)
    assert status == NOT_RUN == 6 and line.startswith("pytest: NOT RUN: 1 selected test(s) skipped")
    assert "tensorrt is not importable" in line and "2 passed, 1 skipped" in line
    # nothing collected (pytest's exit 5): a failure, not ok
    rc, out = _pytest(tmp_path, "tensorrt")
    assert rc == 5 and pytest_verdict(rc, out) == (5, "pytest: FAILED: no tests collected (exit 5): nothing was "
                                                      "checked on the GPU")
    # a failing test fails the step with pytest's status
    rc, out = _pytest(tmp_path, "gpu", broken=True, skip=False)
    assert rc == 1 and pytest_verdict(rc, out) == (1, "pytest: FAILED (exit 1; 1 failed, 2 passed)")
    # the command gpu_check.sh calls: the line on stdout, the status as its exit code
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_verdict.py"), "0", str(tmp_path / "out.txt")],
                         capture_output=True, text=True)
    # out.txt: the failing run; its summary line fails the step even if the status given were 0
    assert res.returncode == 1 and res.stdout.startswith("pytest: FAILED (exit 0; 1 failed, 2 passed)")
    _pytest(tmp_path, "tensorrt")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_verdict.py"), "5", str(tmp_path / "out.txt")],
                         capture_output=True, text=True)
    assert res.returncode == 5 and "no tests collected" in res.stdout


def test_gpu_check_no_longer_calls_an_empty_or_skipped_run_ok():
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert 'benchmarks/gpu_verdict.py "$trc"' in script and 'log "pytest: ok"' not in script


def test_gpu_bench_reports_a_failed_training_run_by_name_and_exits_1():
    import gpu_bench

    ok = {"run": "late LoRA (q,k,v,mlp r32, late blocks)", "status": "ok", "steps_per_s": 5.0,
          "median_step_ms": 200.0, "peak_memory_mb": 900.0, "trainable_parameters": 1000}
    failed = gpu_bench.failed_run("full finetuning", RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore"))
    assert failed == {"run": "full finetuning", "status": "failed",
                      "reason": "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"}
    assert gpu_bench.exit_status([], [ok]) == 0
    assert gpu_bench.exit_status([], [ok, failed]) == 1
    assert gpu_bench.exit_status([{"status": "skipped"}], [{"run": "training", "status": "skipped", "reason": "x"}]) == 0
    result = {"config": {"model": "vit_b", "image_size": 1024}, "device": "GPU", "versions": {"torch": "2"},
              "created": "now", "cases": [], "training": [ok, failed], "summary": {}}
    md = gpu_bench.format_markdown(result)
    assert "| full finetuning: FAILED (RuntimeError: CUDA out of memory. Tried to allocate 2 GiB) |" in md
    assert "| late LoRA (q,k,v,mlp r32, late blocks) | 5.000 |" in md
