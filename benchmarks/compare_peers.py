"""Our export against samexporter's, same merged weights, each encoder timed in its own process.

    python benchmarks/compare_peers.py --out /tmp/peers             # vit_b at 1024, ~6 min on 2 cores

samexporter (PyPI, the common way to export SAM to ONNX) is installed ``--no-deps`` with ``timm``
into a throwaway virtual environment under OUT (it sees this environment's torch and
segment_anything); if that fails the peer cases are skipped with the reason. Both export the
same merged checkpoint (random weights with a random LoRA merged in; latency does not depend on
the values). Printed: median encoder latency and process peak RSS of every case, and ours/peer
per precision (< 1 is faster). Writes OUT/compare_peers.json and OUT/compare_peers.md.

``bench_cpu.py --peers`` runs the same peer cases inside its one run; this script is the
standalone version, and the home of the helpers both use.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEER = "samexporter"
PEER_PACKAGES = ("samexporter", "timm")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- one graph in a fresh process -----------------------------------------------------------


def time_graph_worker(path: str, backend: str, input_name: str, image_size: int, warmup: int, iterations: int) -> dict:
    """Load one encoder graph on ``backend`` and time it (runs inside the worker process)."""
    import numpy as np

    from peft_export.bench.stats import current_rss_mb, peak_rss_mb, summarize_timings

    t = time.perf_counter()
    if backend == "onnxruntime":
        import onnxruntime as ort

        from peft_export.runtime import session_options

        sess = ort.InferenceSession(path, session_options("cpu"), providers=["CPUExecutionProvider"])
        run = lambda feeds: sess.run(None, feeds)  # noqa: E731
    else:
        from peft_export.runtime.backends.ov import OpenVinoBackend

        ov = OpenVinoBackend({"g": Path(path)}, "cpu")
        run = lambda feeds: ov.run("g", feeds)  # noqa: E731
    load_s = time.perf_counter() - t
    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    for _ in range(warmup):
        run({input_name: x})
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        run({input_name: x})
        times.append(time.perf_counter() - t)
    stats = summarize_timings(times)
    stats["times_ms"] = [round(s * 1000, 2) for s in times]
    stats["throughput_unit"] = "images/s"
    return {"components": {"encoder": stats},
            "process": {"load_s": round(load_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
                        "rss_at_end_mb": round(current_rss_mb(), 1), "torch_imported": "torch" in sys.modules}}


def time_graph(name: str, path: Path, backend: str, input_name: str, image_size: int, warmup: int,
               iterations: int, model: str, precision: str) -> dict:
    """Time one encoder graph in a fresh process: a bench-format case with the machine's load around it."""
    from peft_export.bench.load import load_between, snapshot

    before = snapshot()
    cmd = [sys.executable, __file__, "--time-graph", str(path), "--backend", backend, "--input-name", input_name,
           "--image-size", str(image_size), "--warmup", str(warmup), "--iterations", str(iterations)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    load = load_between(before, snapshot())
    case = {"case": name, "model": model, "backend": backend, "precision": precision, "device": "cpu",
            "provider": "cpu", "details": {"graph": str(path)}, "load": load, "components": {}}
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {**case, "status": "failed", "reason": last[-1] if last else f"exit {proc.returncode}"}
    return {**case, "status": "ok", "reason": None, **json.loads(proc.stdout.strip().splitlines()[-1])}


# ---- the peer ---------------------------------------------------------------------------------


def peer_venv(root: Path) -> tuple[Path | None, str | None]:
    """A throwaway venv with samexporter (+ timm, --no-deps) that sees this environment's packages."""
    venv = root / "peer-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"cannot create a venv ({r.stderr.strip().splitlines()[-1:]})"
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *PEER_PACKAGES],
                       capture_output=True, text=True)
    if r.returncode != 0:
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and not ln.startswith("WARNING")]
        return None, f"pip install --no-deps {' '.join(PEER_PACKAGES)} failed: {last[-1] if last else r.returncode}"
    return python, None


def peer_export(python: Path, checkpoint: Path, out: Path, model_type: str) -> tuple[dict, str | None]:
    """samexporter's fp32 encoder and its int8 (its own quantize_dynamic settings) of ``checkpoint``."""
    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / "encoder.onnx", out / "encoder.quant.onnx"
    t = time.perf_counter()
    r = subprocess.run([str(python), "-m", "samexporter.export_encoder", "--checkpoint", str(checkpoint),
                        "--output", str(fp32), "--model-type", model_type, "--quantize-out", str(int8)],
                       capture_output=True, text=True)
    if r.returncode != 0 or not fp32.exists():
        last = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        return {}, f"samexporter.export_encoder failed: {last[-1] if last else r.returncode}"
    graphs = {"fp32": fp32}
    if int8.exists():
        graphs["int8"] = int8
    return {"graphs": graphs, "export_s": round(time.perf_counter() - t, 1),
            "version": _peer_version(python)}, None


def _peer_version(python: Path) -> str | None:
    r = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('samexporter'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or None


def peer_cases(root: Path, checkpoint: Path, model_type: str, image_size: int, warmup: int, iterations: int,
               backends: list[str]) -> tuple[list[dict], dict]:
    """Every peer case (or one skip record with the reason) and what was installed."""
    if image_size != 1024:
        return [], {"skipped": f"{PEER} exports SAM at 1024 px only (segment_anything's registry)"}
    python, why = peer_venv(root)
    if why:
        return [], {"skipped": why}
    log(f"{PEER}: exporting {checkpoint.name}")
    export, why = peer_export(python, checkpoint, root / "peer-export", model_type)
    if why:
        return [], {"skipped": why}
    cases = []
    for precision, path in export["graphs"].items():
        for backend in backends:
            name = f"{PEER} {backend} {precision}"
            log(f"timing {name} in a fresh process")
            cases.append(time_graph(name, path, backend, "input_image", image_size, warmup, iterations,
                                    "peer", precision))
    return cases, {"version": export["version"], "export_s": export["export_s"]}


def ratios(cases: list[dict], ours_model: str = "export") -> dict:
    """ours / peer median per precision and backend, and best-of-ours / best-of-peer per precision."""
    ok = [c for c in cases if c.get("status") == "ok" and "encoder" in c.get("components", {})]
    med = lambda c: c["components"]["encoder"]["median_ms"]  # noqa: E731
    out: dict = {}
    for precision in ("fp32", "int8"):
        ours = [c for c in ok if c.get("model") == ours_model and c["precision"] == precision]
        peer = [c for c in ok if c.get("model") == "peer" and c["precision"] == precision]
        if not ours or not peer:
            continue
        row = {"best_ours_over_best_peer": round(min(map(med, ours)) / min(map(med, peer)), 3)}
        for c in ours:
            same = [p for p in peer if p["backend"] == c["backend"]]
            if same:
                row[f"ours_over_peer_{c['backend']}"] = round(med(c) / med(same[0]), 3)
        out[precision] = row
    return out


# ---- standalone ------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("compare_peers_out"))
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--backends", default="onnxruntime,openvino", help="our backends to time (openvino if installed)")
    ap.add_argument("--time-graph", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--input-name", help=argparse.SUPPRESS)
    ap.add_argument("--image-size", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_graph:  # worker mode
        print(json.dumps(time_graph_worker(args.time_graph, args.backend, args.input_name, args.image_size,
                                           args.warmup, args.iterations)))
        return 0

    import importlib.util

    from peft_export import bench
    from peft_export.bench.stats import device_info

    from merged_models import build_merged_checkpoint, export_model  # noqa: E402 (same folder)

    backends = [b for b in args.backends.split(",") if b != "openvino" or importlib.util.find_spec("openvino")]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = build_merged_checkpoint(args.out, args.model, 1024)
    export, _ = export_model(ckpt, args.out / "ours", ["fp32", "int8"])
    cases = []
    for precision in ("fp32", "int8"):
        path = export / ("encoder.onnx" if precision == "fp32" else "encoder.int8.onnx")
        for backend in backends:
            name = f"export {backend}-cpu {precision}"
            log(f"timing {name} in a fresh process")
            cases.append(time_graph(name, path, backend, "image", 1024, args.warmup, args.iterations,
                                    "export", precision))
    peers, peer_info = peer_cases(args.out, ckpt, args.model, 1024, args.warmup, args.iterations, backends)
    cases += peers
    reference = cases[0]["case"]
    bench.add_ratios(cases, reference)
    result = {"format": bench.BENCH_FORMAT, "format_version": bench.BENCH_FORMAT_VERSION,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": device_info(),
              "settings": {"device": "cpu", "model_type": args.model, "image_size": 1024, "warmup": args.warmup,
                           "iterations": args.iterations, "fresh_process": True},
              "peer": peer_info, "reference": reference, "cases": cases, "ratios": ratios(cases),
              "elapsed_s": round(time.perf_counter() - t0, 1)}
    lines = [bench.format_table(result)]
    if peer_info.get("skipped"):
        lines.append(f"\n{PEER} skipped: {peer_info['skipped']}")
    for precision, row in result["ratios"].items():
        lines.append(f"\n{precision}: " + ", ".join(f"{k} {v}" for k, v in row.items()) + " (target <= 0.8)")
    text = "\n".join(lines)
    print(text)
    bench.write_json(args.out / "compare_peers.json", result)
    bench.write_text(args.out / "compare_peers.md", bench.format_table(result, markdown=True) + "\n" + "\n".join(lines[1:]) + "\n")
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
