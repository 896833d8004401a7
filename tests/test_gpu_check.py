"""benchmarks/gpu_check.sh and gpu_bench.py up to the CUDA calls: the dry run checks imports, the CUDA
test selection and the benchmark's arguments on any machine; every GPU-only test carries the mark the
script selects; the benchmark's whole code path runs on the CPU with the tiny model."""

from __future__ import annotations

import ast
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


def test_every_test_that_needs_a_gpu_is_marked_so_the_script_runs_it():
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            text = _decorators(node) + ast.get_source_segment(source, node)
            needs_gpu = re.search(r"cuda\.is_available\(\)|device_count\(\)|HAVE_GPU", text) and "skip" in text
            skips_when_present = "present" in text  # refusal tests skip where the GPU *is* there
            marked = re.search(r"mark\.(gpu|tensorrt)\b", _decorators(node))
            if needs_gpu and not skips_when_present and not marked:
                unmarked.append(f"{path.name}::{node.name}")
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
