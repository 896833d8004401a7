#!/usr/bin/env bash
# GPU check: `pytest -m gpu` and the vit_b GPU benchmark, within 8 minutes in all.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Needs only this repository and a CUDA machine whose Python has torch. It installs
# nothing from the network (such machines may have no internet; GPU_CHECK_WHEELS=DIR
# installs carried wheels): the repo runs from source through PYTHONPATH. Missing packages are reported; without torch+CUDA or segment_anything it
# stops at once with a non-zero code. Writes into OUTDIR: env.txt, pytest_gpu.txt,
# gpu_bench.{txt,json,md,png}, gpu_check.log. Exit code: 0 all passed, 3 no CUDA,
# 4 a required package missing, otherwise the first failing step's code (124 = timeout).
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
PY=${PYTHON:-python}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-170}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-280}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }

log "repo $PWD, python $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1)"
timeout 60 "$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib, importlib.util, subprocess
for mod in ("torch", "segment_anything", "numpy", "onnx", "onnxruntime", "tensorrt", "typer", "safetensors",
            "scipy", "tifffile", "PIL", "matplotlib", "pytest"):
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
        print("gpu", torch.cuda.get_device_name(0))
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

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    log "FAIL: torch with a CUDA device is not available here"
    exit 3
fi
# A machine without internet can still get the pure-Python packages: on a machine with the
# registry, `pip download -d wheels segment-anything safetensors typer onnx onnxscript tifffile`
# and carry wheels/ along; GPU_CHECK_WHEELS=wheels installs from it (never from the network).
if [ -n "${GPU_CHECK_WHEELS:-}" ] && [ -d "$GPU_CHECK_WHEELS" ]; then
    log "installing from $GPU_CHECK_WHEELS (no index)"
    "$PY" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" "$GPU_CHECK_WHEELS"/*.whl \
        >> "$OUT/gpu_check.log" 2>&1 || log "note: offline install from $GPU_CHECK_WHEELS failed (see gpu_check.log)"
fi
missing=""
for mod in segment_anything numpy safetensors; do
    "$PY" -c "import $mod" 2>/dev/null || missing="$missing $mod"
done
if [ -n "$missing" ]; then
    log "FAIL: required package(s) not importable:$missing (pip install -e . needs them; this script installs nothing)"
    exit 4
fi
for mod in pytest typer onnx onnxruntime matplotlib; do
    "$PY" -c "import $mod" 2>/dev/null || log "note: $mod is not importable; the parts needing it are skipped or fail"
done

rc=0
if "$PY" -c "import pytest, typer" 2>/dev/null; then
    log "pytest -m gpu (timeout ${TEST_TIMEOUT}s)"
    timeout "$TEST_TIMEOUT" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests \
        > "$OUT/pytest_gpu.txt" 2>&1
    trc=$?
    tail -n 25 "$OUT/pytest_gpu.txt"
    # 5 = no tests collected: not a failure of the code under test.
    if [ $trc -ne 0 ] && [ $trc -ne 5 ]; then log "pytest -m gpu: exit $trc"; rc=$trc; else log "pytest -m gpu: ok"; fi
else
    log "skip pytest -m gpu: pytest or typer is not importable"
fi

log "benchmarks/gpu_bench.py (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.txt"
brc=${PIPESTATUS[0]}
if [ "$brc" -ne 0 ]; then log "gpu_bench: exit $brc"; [ $rc -eq 0 ] && rc=$brc; else log "gpu_bench: ok"; fi
log "done, exit $rc; outputs in $OUT"
exit $rc
