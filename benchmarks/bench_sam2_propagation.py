"""SAM 2 propagation cost per frame: the torch-free tracker on the exported graphs vs SAM2VideoPredictor.

    python benchmarks/bench_sam2_propagation.py --out /tmp/bench_sam2_prop                 # 1024 and 512
    python benchmarks/bench_sam2_propagation.py --out /tmp/b --sizes 256 --frames 4 --quick  # smoke test

hiera_t (sam2.1) with random weights (seeded), one object clicked on frame 0 of a synthetic clip, propagated
forward over ``--frames`` frames. Each case runs in a fresh process (``--worker``), one case at a time:

- ``export``: ``Sam2Propagator`` (ONNX Runtime, CPU) on ``merge-and-export --video`` of the same weights;
- ``torch``: sam2's ``SAM2VideoPredictor`` in torch eager, fp32 (``--quick`` leaves it out).

Reported per case: the first (prompted) frame, and the median wall time per frame AFTER the first
(encoder + memory attention + decoder + memory encoder of one object), and for the export the median
time of each graph per tracked frame. The export's bank has a fixed capacity (``memory_slots`` of the
manifest), so its cost per tracked frame is the same from the second frame on; sam2's grows until its
``num_maskmem`` memories are filled, so the median over frames 1.. is lower for short clips -- give
``--frames`` >= 10 for the steady state. Prints the CPU model and the load around every case, and
writes OUT/bench_sam2_propagation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def clip(frames: int, size: int = 480):
    """A synthetic movie: a bright disk drifting over noise, uint8 RGB, 3:4 frames."""
    import numpy as np

    rng = np.random.default_rng(0)
    h, w = (3 * size) // 4, size
    yy, xx = np.mgrid[:h, :w]
    out = []
    for t in range(frames):
        img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        img[(yy - h // 2 - 2 * t) ** 2 + (xx - w // 3 - 3 * t) ** 2 < (h // 5) ** 2] = [200, 180, 90]
        out.append(img)
    return out


def build(size: int):
    """SAM2VideoPredictor holding the benchmark's weights (``random_sam2``, seed 0): the export's too."""
    from sam2.build_sam import build_sam2_video_predictor

    from peft_export.models.sam2 import random_sam2, sam2_overrides

    predictor = build_sam2_video_predictor(CONFIG, None, device="cpu", hydra_overrides_extra=sam2_overrides(size))
    predictor.load_state_dict(random_sam2("sam2.1_hiera_t", size, seed=0).state_dict())
    return predictor


def export(size: int, out: Path) -> None:
    """``merge-and-export --video`` of the benchmark's weights."""
    from peft_export.export import merge_and_export
    from peft_export.models import load_sam
    from peft_export.peft.adapters import AdaptedModel

    model, info = load_sam("sam2.1_hiera_t", None, size, seed=0, warn_random=False)  # random_sam2's weights, seed 0
    adapted = AdaptedModel(model, None, info)
    merge_and_export(adapted, out, overwrite=True, progress=False, video=True)


def worker(kind: str, size: int, frames: int, export_dir: str, out: str) -> None:
    """One case in this process; writes {"frame_s": [...], "graphs_s": {...}} to ``out``."""
    frames_rgb = clip(frames)
    h, w = frames_rgb[0].shape[:2]
    prompts = {1: {0: {"points": [[w // 3, h // 2]], "labels": [1]}}}
    stamps = [time.perf_counter()]
    graphs: dict = {}
    if kind == "export":
        from peft_export.runtime.sam2_video import Sam2Propagator

        session = Sam2Propagator(export_dir)
        run = session._backend.run

        def timed(name, feeds):  # per graph wall time
            t0 = time.perf_counter()
            result = run(name, feeds)
            graphs.setdefault(name, []).append(time.perf_counter() - t0)
            return result

        session._backend.run = timed
        stamps = [time.perf_counter()]
        for _ in session.propagate(frames_rgb, prompts, direction="forward"):
            stamps.append(time.perf_counter())
    else:
        import tempfile

        import numpy as np
        import torch
        from PIL import Image

        predictor = build(size)
        with tempfile.TemporaryDirectory() as tmp:
            for i, f in enumerate(frames_rgb):
                Image.fromarray(f).save(Path(tmp) / f"{i}.jpg", quality=95)
            with torch.inference_mode():
                state = predictor.init_state(tmp)
                stamps = [time.perf_counter()]
                predictor.add_new_points_or_box(state, 0, 1, points=np.array(prompts[1][0]["points"], np.float32),
                                                labels=np.array([1], np.int32))
                for _ in predictor.propagate_in_video(state):
                    stamps.append(time.perf_counter())
    # the first yield closes the prompted frame; the export session's encoder of frame 0 runs inside it too
    frame_s = [b - a for a, b in zip(stamps, stamps[1:])]
    per_graph = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in graphs.items()}
    Path(out).write_text(json.dumps({"frame_s": frame_s, "graphs_s": per_graph}))


def run_case(kind: str, size: int, frames: int, export_dir: Path, out_dir: Path, threads: int | None) -> dict:
    from peft_export.bench.load import describe_load, load_between, snapshot

    result = out_dir / f"{kind}_{size}.json"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    before = snapshot()
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--sizes", str(size), "--frames", str(frames),
                           "--export", str(export_dir), "--result", str(result)],
                          env=env, capture_output=True, text=True)
    load = load_between(before, snapshot())
    if proc.returncode:
        return {"kind": kind, "size": size, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    data = json.loads(result.read_text())
    after_first = data["frame_s"][1:]
    return {"kind": kind, "size": size, "first_frame_s": data["frame_s"][0],
            "per_frame_after_first_s": statistics.median(after_first) if after_first else None,
            "frames_s": data["frame_s"], "graphs_s": data["graphs_s"], "load": load,
            "load_text": describe_load(load)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_sam2_propagation"))
    ap.add_argument("--sizes", default="1024,512", help="model image sizes (frames are resized to SxS)")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="export cases only (no torch reference)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the workers")
    ap.add_argument("--worker", choices=("export", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--export", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        worker(args.worker, sizes[0], args.frames, args.export, args.result)
        return

    from peft_export.bench.stats import device_info, library_versions

    args.out.mkdir(parents=True, exist_ok=True)
    machine = device_info()
    print(f"# SAM 2 propagation per frame, hiera_t, random weights, {args.frames} frames, 1 object")
    print(f"# {machine['cpu']}, {machine['cpu_count_usable']} usable cores, load avg {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    for size in sizes:
        export_dir = args.out / f"export_{size}"
        if not (export_dir / "manifest.json").is_file():
            export(size, export_dir)
        for kind in ("export",) + (() if args.quick else ("torch",)):
            row = run_case(kind, size, args.frames, export_dir, args.out, args.threads)
            rows.append(row)
            if "error" in row:
                print(f"{size:5d} {kind:6s} failed: {row['error']}")
                continue
            graphs = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in row["graphs_s"].items())
            print(f"{size:5d} {kind:6s} first frame {row['first_frame_s']:.2f} s, per frame after the first "
                  f"{row['per_frame_after_first_s']:.2f} s ({row['load_text']})" + (f"; {graphs}" if graphs else ""))
        pair = {r["kind"]: r for r in rows if r["size"] == size and "error" not in r}
        if len(pair) == 2:
            ratio = pair["torch"]["per_frame_after_first_s"] / pair["export"]["per_frame_after_first_s"]
            print(f"{size:5d} torch eager / export per frame after the first: {ratio:.2f}x")
    report = {"machine": machine, "versions": library_versions(), "frames": args.frames, "cases": rows}
    (args.out / "bench_sam2_propagation.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
