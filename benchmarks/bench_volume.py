"""Volumes (issue 33): speed of automatic 3D and propagation, reopening without an encoder, peak memory.

    python benchmarks/bench_volume.py --out bench_volume/ [--export EXPORT_DIR] [--planes 64] [--size 512]
        [--rss-size 2048] [--rss-planes 32,64] [--parts auto3d,aisdec,propagate,reopen,rss] [--quick]

Without --export a random vit_t export with an instance decoder is made at --size (512: the issue's
case). Each part runs in a fresh process; the parent prints the CPU model and load average and
writes bench_volume.json / .md with each figure beside its target:

- auto3d: automatic 3D of a --planes x size x size synthetic nuclei volume (AIS per plane, then the
  merge), all in (encoder, decoder, watershed, merge): seconds per plane (target <= 1.2 s), for each
  of --runs (backend:precision; bf16 is OpenVINO's bf16 mode, run where the CPU has native bfloat16 and
  exported with the made export then);
- aisdec: for each of --runs, the instance decoder graph alone on one plane's embedding (median of 5 after a warm-up) and
  its convolutions' multiply-adds counted from the graph: the GFLOP/s it runs at, to set beside the
  CPU's fp32 peak (how much of automatic 3D's time any runtime could win back);
- propagate: once every plane is embedded, one object carried from the middle plane through all
  --planes planes (IoU threshold 0, so it never stops early): seconds (target <= 1 s);
- reopen: the embeddings saved to a zarr store, then a new process opens the store and runs
  automatic 3D and a propagation: encoder runs counted (target 0);
- rss: `peftexport predict EXPORT volume.zarr --instances --3d -o labels.zarr` on uint16 zarr volumes
  of --rss-size² planes, for each of --rss-planes: peak RSS (VmHWM) of the process (target <= 3 GB,
  the same for every plane count: the slabs keep a few planes and the object graph, not the volume).

--quick: tiny sizes, to check the script runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TARGETS = {"auto3d_s_per_plane": 1.2, "propagate_s": 1.0, "reopen_encoder_runs": 0, "rss_mb": 3072.0}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def volume_tif(path: Path, planes: int, size: int, seed: int = 0) -> Path:
    import tifffile

    from peft_export.data.synthetic_volume import synthetic_volume

    if not path.exists():
        image, _ = synthetic_volume((planes, size, size), seed=seed)
        tifffile.imwrite(path, image, metadata={"axes": "ZYX"}, photometric="minisblack")
    return path


def volume_zarr(path: Path, planes: int, size: int) -> Path:
    """A planes x size² uint16 zarr written plane by plane (256-px demo tiles of a small pool, cycled)."""
    import zarr

    from peft_export.data.synthetic_volume import synthetic_volume

    if path.exists():
        return path
    pool, _ = synthetic_volume((16, 256, 256), seed=3)
    z = zarr.open_array(str(path), mode="w", shape=(planes, size, size), chunks=(1, 1024, 1024), dtype="uint16",
                        zarr_format=2)
    reps = -(-size // 256)
    for k in range(planes):
        z[k] = np.tile(pool[k % 16], (reps, reps))[:size, :size]
    return path


# ---- children (each in a fresh process) ---------------------------------------------------------


def child_auto3d(export: str, image: str, backend: str = "onnxruntime", precision: str = "fp32") -> dict:
    from peft_export.runtime import SamSession
    from peft_export.volume import open_stack, segment_volume

    session = SamSession(export, backend=backend, precision=precision)
    stack = open_stack(image)
    t0 = time.perf_counter()
    labels = segment_volume(session, stack, mode="ais")
    seconds = time.perf_counter() - t0
    return {"planes": stack.n_planes, "seconds": seconds, "s_per_plane": seconds / stack.n_planes,
            "objects": int(labels.max())}


def conv_macs(onnx_path: str) -> int:
    """Multiply-adds of a graph's Conv nodes (output elements x kernel size x input channels per group)."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(onnx_path))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    return int(sum(np.prod(shapes[n.output[0]], dtype=np.int64) * np.prod(weights[n.input[1]][1:], dtype=np.int64)
                   for n in model.graph.node if n.op_type == "Conv"))


def child_ais_decoder(export: str, image: str, backend: str = "onnxruntime", precision: str = "fp32") -> dict:
    from peft_export.runtime import SamSession
    from peft_export.volume import open_stack

    session = SamSession(export, backend=backend, precision=precision)
    key = session._ais_graph(None)
    emb = session.encode(np.asarray(open_stack(image)[0])).embedding
    feeds = {"image_embeddings": np.asarray(emb, np.float32)}
    session._backend.run(key, feeds)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        session._backend.run(key, feeds)
        times.append(time.perf_counter() - t0)
    ms = 1000 * float(np.median(times))
    macs = conv_macs(str(Path(export) / session.manifest["graphs"][key]["fp32"]["path"]))
    return {"ms": ms, "conv_gmac": macs / 1e9, "gflops": 2 * macs / 1e9 / (ms / 1000)}


def _counted(session) -> list:
    runs = [0]
    run = session._backend.run

    def counted(name, feeds):
        runs[0] += name == "encoder"
        return run(name, feeds)

    session._backend.run = counted
    return runs


def _middle_object(vol, labels):
    z = vol.stack.n_planes // 2
    ids, counts = np.unique(labels[z][labels[z] > 0], return_counts=True)
    return z, (labels[z] == ids[np.argmax(counts)]) if len(ids) else None


def child_propagate(export: str, image: str) -> dict:
    from peft_export.runtime import SamSession
    from peft_export.volume import VolumeEmbeddings, open_stack, segment_object_in_volume, segment_volume

    session = SamSession(export)
    vol = VolumeEmbeddings(session, open_stack(image))
    vol.compute()
    z, mask = _middle_object(vol, segment_volume(session, vol, mode="ais"))
    if mask is None:
        return {"error": "no object on the middle plane"}
    t0 = time.perf_counter()
    seg, span = segment_object_in_volume(vol, {z: mask}, iou_threshold=0.0)
    seconds = time.perf_counter() - t0
    return {"planes": vol.stack.n_planes, "seconds": seconds, "span": list(span),
            "planes_with_object": int(seg.any(axis=(1, 2)).sum())}


def child_reopen(export: str, image: str, store: str, make: bool) -> dict:
    from peft_export.runtime import SamSession
    from peft_export.volume import VolumeEmbeddings, open_stack, segment_object_in_volume, segment_volume

    session = SamSession(export)
    runs = _counted(session)
    vol = VolumeEmbeddings(session, open_stack(image), store=store)
    if make:
        vol.compute()
        return {"encoder_runs": runs[0]}
    labels = segment_volume(session, vol, mode="ais")
    z, mask = _middle_object(vol, labels)
    if mask is not None:
        segment_object_in_volume(vol, {z: mask})
    return {"encoder_runs": runs[0], "volume_encoder_runs": vol.encoder_runs, "objects": int(labels.max())}


def child_rss(export: str, image: str, out: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "peft_export.cli", "predict", export, image, "--instances", "--3d",
                           "-o", out, "-q", "--overwrite"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return {"seconds": time.perf_counter() - t0}


def run_child(args: list, rss: bool = False) -> dict:
    """This script with ``--child ...`` in a fresh process; its JSON answer (and its peak RSS)."""
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    if rss:  # the predict process itself is the one measured: wrap it to read its VmHWM
        code = ("import resource, subprocess, sys, json; p = subprocess.Popen(sys.argv[1:]); "
                "import time\nhwm = 0\nwhile p.poll() is None:\n"
                "    try:\n        s = open(f'/proc/{p.pid}/status').read()\n"
                "        hwm = max(hwm, int(next(l for l in s.splitlines() if l.startswith('VmHWM')).split()[1]))\n"
                "    except Exception:\n        pass\n    time.sleep(0.2)\n"
                "print(json.dumps({'peak_rss_mb': hwm / 1024, 'returncode': p.returncode}))")
        out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "peft_export.cli", *map(str, args)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        answer = json.loads(out.stdout.strip().splitlines()[-1])
        if answer.pop("returncode") != 0:  # a failed run's peak says nothing about the run
            lines = out.stderr.strip().splitlines()
            return {"error": lines[-1] if lines else "predict failed"}
        return answer
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_export(out: Path, size: int) -> Path:
    from bench_cpu import build_merged_checkpoint
    from bench_vit_t import export_precisions

    ckpt = build_merged_checkpoint(out, "vit_t", size)
    from peft_export.runtime.backends.ov import native_bf16

    extra = ("bf16",) if native_bf16() is None else ()
    export, _ = export_precisions(ckpt, out / f"vit_t_ais_{size}", size, instance_decoder=True, extra=extra)
    return export


def chosen_runs(text: str, export: Path) -> tuple[list[tuple[str, str]], dict]:
    """--runs as (backend, precision) pairs the export and this CPU can run, and why the others cannot."""
    from peft_export.runtime.backends.ov import native_bf16
    from peft_export.runtime.manifest import read_manifest

    have = set((read_manifest(export)["graphs"].get("ais_decoder") or {}))
    no_bf16 = native_bf16() if "bf16" in text else None  # asks OpenVINO once
    runs, skipped = [], {}
    for item in [t for t in text.split(",") if t]:
        backend, _, precision = item.partition(":")
        precision = precision or "fp32"
        why = no_bf16 if precision == "bf16" else None
        if why is None and precision not in have:
            why = f"the export has no {precision} instance decoder"
        if why:
            skipped[item] = why
        else:
            runs.append((backend, precision))
    return runs, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--export", type=Path, default=None)
    ap.add_argument("--planes", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rss-size", type=int, default=2048)
    ap.add_argument("--rss-planes", default="32,64")
    ap.add_argument("--parts", default="auto3d,aisdec,propagate,reopen,rss")
    ap.add_argument("--runs", default="onnxruntime:fp32,openvino:fp32,openvino:bf16",
                    help="backend:precision pairs for auto3d and aisdec")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs="+", default=None)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"auto3d": child_auto3d, "aisdec": child_ais_decoder, "propagate": child_propagate,
              "reopen": child_reopen}[kind]
        if kind == "reopen":
            rest = [rest[0], rest[1], rest[2], rest[3] == "make"]
        print(json.dumps(fn(*rest)))
        return
    if args.out is None:
        ap.error("--out is required")
    if args.quick:
        args.planes, args.size, args.rss_size, args.rss_planes = 6, min(args.size, 128), 256, "2,4"
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    export = args.export or make_export(args.out, args.size)
    image = volume_tif(args.out / f"volume_{args.planes}x{args.size}.tif", args.planes, args.size)
    report = {"cpu": cpu_name(), "load_average_start": os.getloadavg(), "export": str(export),
              "planes": args.planes, "size": args.size, "targets": TARGETS, "results": {}}
    res = report["results"]
    print(f"{report['cpu']}, load average {report['load_average_start']}")
    runs, report["runs_skipped"] = chosen_runs(args.runs, Path(export))
    for why in report["runs_skipped"].items():
        print("skipped", *why)
    for part in ("auto3d", "aisdec"):
        if part in parts:
            res[part] = {}
            for backend, precision in runs:
                res[part][f"{backend} {precision}"] = run_child([part, export, image, backend, precision])
                print(part, backend, precision, res[part][f"{backend} {precision}"])
    if "propagate" in parts:
        res["propagate"] = run_child(["propagate", export, image])
        print("propagate", res["propagate"])
    if "reopen" in parts:
        store = args.out / "embeddings.zarr"
        if store.exists():
            import shutil

            shutil.rmtree(store)
        run_child(["reopen", export, image, store, "make"])
        res["reopen"] = run_child(["reopen", export, image, store, "use"])
        print("reopen", res["reopen"])
    if "rss" in parts:
        res["rss"] = {}
        for n in [int(v) for v in args.rss_planes.split(",")]:
            vz = volume_zarr(args.out / f"rss_{n}x{args.rss_size}.zarr", n, args.rss_size)
            res["rss"][n] = run_child(["predict", export, vz, "--instances", "--3d", "-o",
                                       args.out / f"rss_{n}_labels.zarr", "-q", "--overwrite"], rss=True)
            print("rss", n, res["rss"][n])
    report["load_average_end"] = os.getloadavg()
    rows = ["| figure | measured | target |", "|---|---|---|"]
    for run, r in res.get("auto3d", {}).items():
        if "s_per_plane" in r:
            rows.append(f"| automatic 3D, s per plane ({args.planes}x{args.size}², {run}) | {r['s_per_plane']:.3f} | "
                        f"<= {TARGETS['auto3d_s_per_plane']} |")
    for run, a in res.get("aisdec", {}).items():
        if "ms" in a:
            rows.append(f"| instance decoder alone, ms per plane ({run}; {a['conv_gmac']:.1f} GMAC of convolutions) | "
                        f"{a['ms']:.0f} ({a['gflops']:.0f} GFLOP/s) | (no target: what automatic 3D cannot go below) |")
    for run, why in report["runs_skipped"].items():
        rows.append(f"| {run} | not run: {why} | |")
    if "seconds" in res.get("propagate", {}):
        rows.append(f"| propagation through {args.planes} planes, s | {res['propagate']['seconds']:.3f} | "
                    f"<= {TARGETS['propagate_s']} |")
    if "encoder_runs" in res.get("reopen", {}):
        rows.append(f"| encoder runs after reopening the store | {res['reopen']['encoder_runs']} | 0 |")
    for n, r in res.get("rss", {}).items():
        if "peak_rss_mb" in r:
            rows.append(f"| peak RSS, {n}x{args.rss_size}² uint16 zarr, MB | {r['peak_rss_mb']:.0f} | "
                        f"<= {TARGETS['rss_mb']:.0f}, flat in planes |")
    report["table"] = "\n".join(rows)
    (args.out / "bench_volume.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "bench_volume.md").write_text(f"{report['cpu']}, load {report['load_average_start']} -> "
                                              f"{report['load_average_end']}\n\n{report['table']}\n")
    print(report["table"])


if __name__ == "__main__":
    main()
