#!/usr/bin/env bash
# GPU check: every CUDA test (pytest -m "gpu or tensorrt"), the vit_b GPU benchmark and shorter vit_t
# (MobileSAM) and SAM 2.1 hiera_t ones, in 10 minutes at most.
#
#   benchmarks/gpu_check.sh OUTDIR              # on a CUDA machine
#   benchmarks/gpu_check.sh --dry-run OUTDIR    # any machine: checks imports, the test selection and
#                                               # gpu_bench.py's arguments, runs nothing on a GPU
#
# Needs only this repository and a Python with torch (CUDA build), segment_anything, numpy and
# safetensors. It installs nothing from the network: the repository runs from source through
# PYTHONPATH, and GPU_CHECK_WHEELS=DIR installs wheels carried in DIR (pip --no-index). Tests that
# need a missing optional package (tensorrt, bitsandbytes, onnxruntime-gpu) skip, and the check says
# "pytest: NOT RUN" naming them (benchmarks/gpu_verdict.py reads pytest's skip summary); without the sam2
# package (a source distribution: carry a wheel built with SAM2_BUILD_CUDA=0 pip wheel --no-build-isolation
# sam2==1.1.0, and hydra-core, iopath) the SAM 2 benchmark says "NOT RUN".
# Writes into OUTDIR: env.txt, pytest_gpu.txt, gpu_bench.{txt,json,md}, vit_t/gpu_bench.{txt,json,md}
# (vit_t at 1024: eager fp32 / bf16, base / merged / unmerged, torch.compile, a training run),
# sam2/gpu_bench.{txt,json,md} (hiera_t at 1024: eager fp32 / bf16, base / merged / unmerged, torch.compile,
# the exported encoder on ONNX Runtime's CUDA provider when present), gpu_check.log.
# Exit code: 0 every step ran and passed, 3 no CUDA, 4 a required package missing or torch too old,
# otherwise the first failing step's code (124 = timeout, 5 = pytest collected no test); 6 = nothing
# failed but some GPU tests (or the SAM 2 benchmark) did not run (a package such as tensorrt, bitsandbytes or
# sam2 missing).
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUTDIR}
PY=${PYTHON:-python}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-140}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-240}
BENCH_BUDGET=$(( BENCH_TIMEOUT - 50 ))  # gpu_bench starts no case after this; the rest is for writing out
VIT_T_TIMEOUT=${GPU_CHECK_VIT_T_TIMEOUT:-100}
VIT_T_BUDGET=$(( VIT_T_TIMEOUT - 40 ))
# vit_t: SAM's attention only (TinyViT has no rel-pos attention for the folded SDPA path), batch 1 and 8.
VIT_T_ARGS=(--model vit_t --attention sam --iterations 10 --warmup 3 --train-steps 4)
SAM2_TIMEOUT=${GPU_CHECK_SAM2_TIMEOUT:-110}
SAM2_BUDGET=$(( SAM2_TIMEOUT - 40 ))
# hiera_t: batch 1 and 8, fp32 / bf16; the compiles last (the budget may skip some), no training run.
SAM2_ARGS=(--model sam2.1_hiera_t --iterations 10 --warmup 3)
MARKS="gpu or tensorrt"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }

log "repo $PWD, python $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1)$([ $DRY = 1 ] && echo ', dry run')"
# A machine without internet can still get the pure-Python packages: on a machine with the
# registry, `pip download -d wheels segment-anything safetensors typer onnx onnxscript tifffile bitsandbytes`
# and carry wheels/ along; GPU_CHECK_WHEELS=wheels installs from it (never from the network).
if [ -n "${GPU_CHECK_WHEELS:-}" ] && [ -d "$GPU_CHECK_WHEELS" ] && [ $DRY = 0 ]; then
    log "installing from $GPU_CHECK_WHEELS (no index)"
    "$PY" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" "$GPU_CHECK_WHEELS"/*.whl \
        >> "$OUT/gpu_check.log" 2>&1 || log "note: offline install from $GPU_CHECK_WHEELS failed (see gpu_check.log)"
fi
timeout 60 "$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib, importlib.util, subprocess
for mod in ("torch", "segment_anything", "numpy", "safetensors", "onnx", "onnxruntime", "tensorrt", "bitsandbytes",
            "typer", "scipy", "tifffile", "PIL", "matplotlib", "pytest", "sam2", "hydra", "iopath"):
    ok = importlib.util.find_spec(mod) is not None
    ver = ""
    if ok:
        try:
            ver = getattr(importlib.import_module(mod), "__version__", "")
        except Exception as exc:  # broken install
            ok, ver = False, f"import fails: {exc}"
    print(f"{mod:18} {'ok' if ok else 'MISSING'} {ver}")
try:
    import torch
    print("cuda available", torch.cuda.is_available(), "torch cuda", torch.version.cuda)
    if torch.cuda.is_available():
        print("gpu", torch.cuda.get_device_name(0), "x", torch.cuda.device_count(),
              "native bf16", torch.cuda.is_bf16_supported(including_emulation=False))
except Exception as exc:
    print("torch error", exc)
try:
    import onnxruntime as ort
    print("onnxruntime providers", ort.get_available_providers())
except Exception:
    pass
try:
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
except Exception:
    pass
EOF
cat "$OUT/env.txt"

missing=""
for mod in torch segment_anything numpy safetensors; do
    "$PY" -c "import $mod" 2>/dev/null || missing="$missing $mod"
done
if [ -n "$missing" ]; then
    log "FAIL: required package(s) not importable:$missing (this script installs nothing; see GPU_CHECK_WHEELS)"
    exit 4
fi
if ! problem=$("$PY" -c "import sys, torch; from peft_export._compat import torch_version_problem as p; m = p(torch.__version__); print(m or ''); sys.exit(1 if m else 0)" 2>&1); then
    log "FAIL: $problem"
    exit 4
fi
for mod in pytest typer onnx onnxruntime bitsandbytes tensorrt; do
    "$PY" -c "import $mod" 2>/dev/null || log "note: $mod is not importable; the tests needing it skip"
done
HAVE_SAM2=1
"$PY" -c "import sam2" 2>/dev/null || { HAVE_SAM2=0; log "note: sam2 is not importable; the SAM 2 tests skip and its benchmark is NOT RUN"; }

if [ $DRY = 1 ]; then
    rc=0
    log "dry run: collecting pytest -m \"$MARKS\""
    "$PY" -m pytest -m "$MARKS" --collect-only -q -p no:cacheprovider tests > "$OUT/pytest_gpu.txt" 2>&1
    crc=$?
    tail -n 5 "$OUT/pytest_gpu.txt"
    if [ $crc -ne 0 ]; then log "dry run: test collection failed (exit $crc)"; rc=$crc; fi
    log "dry run: benchmarks/gpu_bench.py --dry-run"
    "$PY" benchmarks/gpu_bench.py --out "$OUT" --budget-s "$BENCH_BUDGET" --dry-run > "$OUT/gpu_bench.txt" 2>&1
    brc=$?
    head -n 3 "$OUT/gpu_bench.txt"
    if [ $brc -ne 0 ]; then log "dry run: gpu_bench.py --dry-run failed (exit $brc)"; [ $rc -eq 0 ] && rc=$brc; fi
    log "dry run: benchmarks/gpu_bench.py ${VIT_T_ARGS[*]} --dry-run"
    mkdir -p "$OUT/vit_t"
    "$PY" benchmarks/gpu_bench.py "${VIT_T_ARGS[@]}" --out "$OUT/vit_t" --budget-s "$VIT_T_BUDGET" --dry-run \
        > "$OUT/vit_t/gpu_bench.txt" 2>&1
    vrc=$?
    head -n 3 "$OUT/vit_t/gpu_bench.txt"
    if [ $vrc -ne 0 ]; then log "dry run: vit_t gpu_bench.py --dry-run failed (exit $vrc)"; [ $rc -eq 0 ] && rc=$vrc; fi
    if [ $HAVE_SAM2 = 1 ]; then
        log "dry run: benchmarks/gpu_bench.py ${SAM2_ARGS[*]} --dry-run"
        mkdir -p "$OUT/sam2"
        "$PY" benchmarks/gpu_bench.py "${SAM2_ARGS[@]}" --out "$OUT/sam2" --budget-s "$SAM2_BUDGET" --dry-run \
            > "$OUT/sam2/gpu_bench.txt" 2>&1
        src=$?
        head -n 3 "$OUT/sam2/gpu_bench.txt"
        if [ $src -ne 0 ]; then log "dry run: sam2 gpu_bench.py --dry-run failed (exit $src)"; [ $rc -eq 0 ] && rc=$src; fi
    fi
    log "dry run done, exit $rc"
    exit $rc
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    log "FAIL: torch with a CUDA device is not available here"
    exit 3
fi

rc=0
not_run=0
if "$PY" -c "import pytest, typer" 2>/dev/null; then
    log "pytest -m \"$MARKS\" (timeout ${TEST_TIMEOUT}s)"
    timeout "$TEST_TIMEOUT" "$PY" -m pytest -m "$MARKS" -q -rs -p no:cacheprovider tests > "$OUT/pytest_gpu.txt" 2>&1
    trc=$?
    tail -n 30 "$OUT/pytest_gpu.txt"
    # ok only when every selected test ran and passed: none collected (5) fails, skips are "NOT RUN" (6)
    verdict=$("$PY" benchmarks/gpu_verdict.py "$trc" "$OUT/pytest_gpu.txt")
    vstatus=$?
    log "$verdict"
    if [ $vstatus -eq 6 ]; then not_run=1; elif [ $vstatus -ne 0 ]; then rc=$vstatus; fi
else
    log "pytest: NOT RUN: pytest or typer is not importable"
    not_run=1
fi

log "benchmarks/gpu_bench.py (timeout ${BENCH_TIMEOUT}s, budget ${BENCH_BUDGET}s)"
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_bench.py --out "$OUT" --budget-s "$BENCH_BUDGET" 2>&1 | tee "$OUT/gpu_bench.txt"
brc=${PIPESTATUS[0]}
if [ "$brc" -ne 0 ]; then log "gpu_bench: exit $brc"; [ $rc -eq 0 ] && rc=$brc; else log "gpu_bench: ok"; fi

log "benchmarks/gpu_bench.py ${VIT_T_ARGS[*]} (timeout ${VIT_T_TIMEOUT}s, budget ${VIT_T_BUDGET}s)"
mkdir -p "$OUT/vit_t"
timeout "$VIT_T_TIMEOUT" "$PY" benchmarks/gpu_bench.py "${VIT_T_ARGS[@]}" --out "$OUT/vit_t" --budget-s "$VIT_T_BUDGET" \
    2>&1 | tee "$OUT/vit_t/gpu_bench.txt"
vrc=${PIPESTATUS[0]}
if [ "$vrc" -ne 0 ]; then log "gpu_bench vit_t: exit $vrc"; [ $rc -eq 0 ] && rc=$vrc; else log "gpu_bench vit_t: ok"; fi

if [ $HAVE_SAM2 = 1 ]; then
    log "benchmarks/gpu_bench.py ${SAM2_ARGS[*]} (timeout ${SAM2_TIMEOUT}s, budget ${SAM2_BUDGET}s)"
    mkdir -p "$OUT/sam2"
    timeout "$SAM2_TIMEOUT" "$PY" benchmarks/gpu_bench.py "${SAM2_ARGS[@]}" --out "$OUT/sam2" --budget-s "$SAM2_BUDGET" \
        2>&1 | tee "$OUT/sam2/gpu_bench.txt"
    src=${PIPESTATUS[0]}
    if [ "$src" -ne 0 ]; then log "gpu_bench sam2: exit $src"; [ $rc -eq 0 ] && rc=$src; else log "gpu_bench sam2: ok"; fi
else
    log "gpu_bench sam2: NOT RUN: the sam2 package is not importable"
    not_run=1
fi
if [ $rc -eq 0 ] && [ $not_run -eq 1 ]; then rc=6; log "done, exit 6: nothing failed, but some GPU tests or benchmarks did not run (see above)"
else log "done, exit $rc; outputs in $OUT"; fi
exit $rc
