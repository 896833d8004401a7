"""Peak memory of static int8 calibration (``merge-and-export --calibration-data``), in our order and in ONNX
Runtime's default order, each in a fresh process.

    python benchmarks/bench_calibration_memory.py --model vit_b --image-size 1024 --images 1,2,16
    python benchmarks/bench_calibration_memory.py --model vit_t --image-size 1024 --images 1,4

The encoder (random weights, seed 0) is exported once to OUT/encoder.onnx; each case quantises it with
the default static recipe (``quantize_int8``, ``Int8Recipe()``) on N random images and reports the
process's peak RSS and time. A case killed for memory is reported as such, not as an error of the run.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ORDERS = ("ours", "onnxruntime")

CHILD = r"""
import contextlib, json, sys, time
import numpy as np
import peft_export.export.quantize as quantize
from peft_export.bench.stats import peak_rss_mb  # VmHWM: ru_maxrss would start at this script's own peak
src, dst, n, order, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if order == "onnxruntime":  # ONNX Runtime's own session: default execution order
    quantize._calibration_in_priority_order = contextlib.nullcontext
rng = np.random.default_rng(0)
images = [rng.standard_normal((1, 3, size, size), dtype=np.float32) for _ in range(n)]
t = time.perf_counter()
quantize.quantize_int8(src, dst, quantize.Int8Recipe(), images)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def export_encoder(model_type: str, size: int, path: Path) -> None:
    from peft_export.export.onnx_graphs import export_encoder_onnx
    from peft_export.models import random_sam

    export_encoder_onnx(random_sam(model_type, size, seed=0).eval(), path)


def run_case(src: Path, out: Path, n: int, order: str, size: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out / f"int8_{order}_{n}.onnx"), str(n), order,
                           str(size)], capture_output=True, text=True)
    if proc.returncode == -signal.SIGKILL:
        return {"status": "killed (out of memory)"}
    if proc.returncode != 0:
        return {"status": "error: " + (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> int:
    from peft_export.bench.stats import device_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_t", help="vit_b, vit_t, tiny, ...")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--images", default="1,2", help="calibration image counts, comma separated")
    ap.add_argument("--orders", default=",".join(ORDERS), help="ours, onnxruntime (its default order)")
    ap.add_argument("--out", type=Path, default=Path("bench_calibration_memory_out"))
    args = ap.parse_args()
    counts = [int(c) for c in args.images.split(",") if c.strip()]
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    for o in orders:
        if o not in ORDERS:
            ap.error(f"--orders: unknown {o!r} (use {', '.join(ORDERS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    src = args.out / "encoder.onnx"
    print(f"exporting {args.model} at {args.image_size} px to {src}", flush=True)
    export_encoder(args.model, args.image_size, src)
    machine = device_info()
    rows = []
    for order in orders:
        for n in counts:
            r = {"order": order, "images": n, **run_case(src, args.out, n, order, args.image_size)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{args.model} @{args.image_size}, static int8 calibration ({machine['cpu']}, "
          f"{machine['cpu_count_usable']} cores, {time.strftime('%Y-%m-%d %H:%M %Z')}):\n")
    print("| order | images | peak RSS | time |\n|---|---:|---:|---:|")
    for r in rows:
        if r["status"] == "ok":
            print(f"| {r['order']} | {r['images']} | {r['peak_rss_mb']:.0f} MB | {r['seconds']:.0f} s |")
        else:
            print(f"| {r['order']} | {r['images']} | {r['status']} | |")
    (args.out / "bench_calibration_memory.json").write_text(json.dumps(
        {"machine": machine, "model": args.model, "image_size": args.image_size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
