"""benchmarks/gpu_check.sh and gpu_bench.py up to the CUDA calls: the dry run checks imports, the CUDA
test selection and the benchmark's arguments on any machine; every GPU-only test carries the mark the
script selects; the benchmark's whole code path runs on the CPU with the tiny model."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ("test_qlora_on_cuda_merges_and_loads_with_sam_model_registry", "test_torchrun_one_gpu_trains_with_nccl",
             "test_merge_on_cuda_keeps_device_and_dtype", "test_tensorrt_engines_match_onnxruntime",
             "test_two_gpu_nccl_training", "test_bench_cuda_event_timings_positive")


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable}


@pytest.mark.slow  # imports torch and collects the whole suite several times: ~1 min
def test_dry_run_checks_imports_test_selection_and_bench_arguments(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dry run done, exit 0" in res.stdout
    env = (tmp_path / "env.txt").read_text()
    assert re.search(r"^torch\s+ok", env, re.M) and "cuda available" in env
    collected = (tmp_path / "pytest_gpu.txt").read_text()
    for name in GPU_TESTS:
        assert name in collected, name
    assert "test_merge_matches_adapter_model" not in collected  # CPU tests are not selected
    bench = (tmp_path / "gpu_bench.txt").read_text()
    assert re.search(r"dry run: \d+ cases on cuda \(vit_b, 1024 px\)", bench)
    assert "encoder base bf16 sdpa compile b1" in bench and "encoder late_lora_unmerged fp32 sam b8" in bench
    if importlib.util.find_spec("sam2") is not None:  # SAM 2.1 hiera_t: eager, compiled, its export on ORT-CUDA
        sam2 = (tmp_path / "sam2" / "gpu_bench.txt").read_text()
        assert re.search(r"dry run: \d+ cases on cuda \(sam2.1_hiera_t, 1024 px\)", sam2), sam2
        assert "encoder late_lora_unmerged bf16 b8" in sam2 and "encoder base bf16 compile b1" in sam2
        assert "export onnxruntime-cuda late_lora_merged fp32 b1" in sam2 and "decoder base fp32 b1" in sam2


def test_bench_refuses_bad_arguments_with_exit_2(tmp_path):
    for bad in (["--precisions", "fp8"], ["--attention", "flash"], ["--batch-sizes", "1,x"], ["--image-size", "100"]):
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--out", str(tmp_path),
                              "--dry-run", *bad], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, bad
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--out", str(tmp_path),
                          "--dry-run", "--model", "vit_x"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "vit_x: unknown" in res.stderr


def _decorators(fn: ast.FunctionDef) -> str:
    return " ".join(ast.unparse(d) for d in fn.decorator_list)


GPU_PROBE = re.compile(r"cuda\.is_available\(\)$|device_count\(\)$|^HAVE_GPU$")


def _without_gpu(node: ast.expr):
    """The value of a skip condition on a machine without a GPU: True/False, or None where it depends
    on something else (tensorrt installed, NCCL, ...). GPU probes are False (0 devices)."""
    text = ast.unparse(node)
    if isinstance(node, (ast.Call, ast.Name, ast.Attribute)) and GPU_PROBE.search(text):
        return 0 if "device_count" in text else False
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        v = _without_gpu(node.operand)
        return None if v is None else not v
    if isinstance(node, ast.BoolOp):
        values = [_without_gpu(v) for v in node.values]
        decides = isinstance(node.op, ast.Or)  # True decides an `or`, False an `and`
        if any(v is not None and bool(v) == decides for v in values):
            return decides
        return None if None in values else not decides
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, right = _without_gpu(node.left), _without_gpu(node.comparators[0])
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            return {ast.Lt: left < right, ast.LtE: left <= right, ast.Gt: left > right, ast.GtE: left >= right,
                    ast.Eq: left == right, ast.NotEq: left != right}.get(type(node.ops[0]))
    return None


def _skip_conditions(fn: ast.FunctionDef) -> list[ast.expr]:
    """Conditions under which a test skips: @pytest.mark.skipif(cond) and `if cond: ... pytest.skip()`."""
    conds = [d.args[0] for d in fn.decorator_list
             if isinstance(d, ast.Call) and ast.unparse(d.func).endswith("mark.skipif") and d.args]
    for node in ast.walk(fn):
        if isinstance(node, ast.If) and any(isinstance(c, ast.Call) and ast.unparse(c.func).endswith("pytest.skip")
                                            for stmt in node.body for c in ast.walk(stmt)):
            conds.append(node.test)
    return conds


def unmarked_gpu_tests(source: str, name: str = "x.py") -> list[str]:
    """Tests that skip on a machine without a GPU yet carry neither mark gpu_check.sh selects."""
    unmarked = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        needs_gpu = any(_without_gpu(c) is True for c in _skip_conditions(node))
        if needs_gpu and not re.search(r"mark\.(gpu|tensorrt)\b", _decorators(node)):
            unmarked.append(f"{name}::{node.name}")
    return unmarked


SAMPLE = '''
import pytest, torch
def test_needs():
    """runs where a GPU is present"""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
def test_needs_two():
    if torch.cuda.device_count() < 2:
        pytest.skip("two GPUs")
@pytest.mark.skipif(not HAVE_GPU, reason="needs a GPU")
def test_needs_decorated(): pass
@pytest.mark.skipif(HAVE_TRT and HAVE_GPU, reason="the refusal cannot run there")
def test_refusal(): pass
def test_refusal_in_body():
    if torch.cuda.is_available():
        pytest.skip("a GPU is there")
@pytest.mark.gpu
def test_marked():
    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("needs CUDA and NCCL")
'''


def test_the_mark_check_tells_needing_a_gpu_from_refusing_one():
    # the word "present" no longer exempts a test; only a skip that fires where the GPU is there does
    assert unmarked_gpu_tests(SAMPLE) == ["x.py::test_needs", "x.py::test_needs_two", "x.py::test_needs_decorated"]


def test_every_test_that_needs_a_gpu_is_marked_so_the_script_runs_it():
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        unmarked += unmarked_gpu_tests(path.read_text(), path.name)
    assert not unmarked, f"GPU-only tests without @pytest.mark.gpu/tensorrt (gpu_check.sh would skip them): {unmarked}"


@pytest.mark.slow
def test_bench_runs_end_to_end_on_the_cpu_with_the_tiny_model(tmp_path):
    # Everything but the CUDA calls: models, merge, parity gates, timing, training, JSON and markdown.
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--out", str(tmp_path),
                          "--device", "cpu", "--model", "tiny", "--image-size", "64", "--batch-sizes", "1",
                          "--precisions", "fp32", "--iterations", "1", "--warmup", "0", "--train-steps", "2",
                          "--budget-s", "900"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    by_name = {c["name"]: c for c in result["cases"]}
    assert by_name["encoder lora_qv_merged fp32 sam b1"]["parity"]["passed"]  # merged == unmerged
    assert by_name["encoder base fp32 sdpa b1"]["parity"]["max_rel"] < 1e-4  # SDPA path == SAM's attention
    assert by_name["encoder base fp32 sdpa compile b1"]["status"] == "skipped"
    assert all(c["timing"]["median_ms"] > 0 for c in result["cases"] if c["status"] == "ok")
    assert [r["peft"] for r in result["training"]] == ["lora", "full"]
    assert all(r["steps_per_s"] > 0 and r["steps"] == 2 for r in result["training"])
    assert "lora_qv merged/base fp32 b1" in result["summary"]
    assert "| encoder base fp32 sdpa b1 | ok |" in (tmp_path / "gpu_bench.md").read_text()


@pytest.mark.slow
def test_sam2_bench_runs_end_to_end_on_the_cpu(tmp_path):
    """gpu_bench.py --model sam2.1_hiera_t on the CPU at 64 px: every path but the CUDA calls (merged vs unmerged
    and the exported encoder on ONNX Runtime checked against eager torch on all three encoder outputs, fp32 and
    bf16, the decoder, the report); a size SAM 2 cannot take is refused with exit 2."""
    pytest.importorskip("sam2", reason="sam2 is not installed")
    script = str(ROOT / "benchmarks" / "gpu_bench.py")
    bad = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--model", "sam2.1_hiera_t", "--image-size",
                          "80", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "SAM 2 needs a multiple of 32" in bad.stderr
    res = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--model", "sam2.1_hiera_t", "--device", "cpu",
                          "--image-size", "64", "--batch-sizes", "1", "--precisions", "fp32,bf16", "--iterations", "1",
                          "--warmup", "0", "--budget-s", "900"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    by_name = {c["name"]: c for c in result["cases"]}
    for p in ("fp32", "bf16"):
        assert by_name[f"encoder late_lora_merged {p} b1"]["parity"]["passed"]  # merged == unmerged
        assert by_name[f"decoder base {p} b1"]["status"] == "ok"
        assert by_name[f"encoder base {p} compile b1"]["status"] == "skipped"
    export = by_name["export onnxruntime-cpu late_lora_merged fp32 b1"]
    assert export["status"] == "ok" and export["parity"]["max_rel"] < 1e-4, export  # the graph == eager torch
    assert all(c["timing"]["median_ms"] > 0 for c in result["cases"] if c["status"] == "ok")
    assert "export / eager fp32 b1 (late_lora merged)" in result["summary"]
    assert "| export onnxruntime-cpu late_lora_merged fp32 b1 | ok |" in (tmp_path / "gpu_bench.md").read_text()
