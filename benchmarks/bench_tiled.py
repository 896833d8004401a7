"""Tiled segmentation of large images (issue 26): correctness, memory, throughput, cost per megapixel.

    python benchmarks/bench_tiled.py --export EXPORT_DIR --out bench_tiled/ \
        [--mosaic 4096] [--sizes 2048,4096,8192,16384] [--rss-size 16384] [--workers 2] [--tile T --halo H] \
        [--parts mosaic,cluster,rss,rss-npy,rss-workers,cost] [--rss-tiles K]

EXPORT_DIR needs an instance decoder (AIS). Parts, each in its own line of bench_tiled.json / .md:

- mosaic: a --mosaic² image of the demo's synthetic nuclei (256-px samples side by side, labels
  known). Tiled AIS on the whole mosaic vs the same model on each 256-px sample alone (untiled):
  mSA of each against the ground truth, and "split": ground-truth objects that a prediction cuts
  into two or more objects (each piece >= 20 % of the object), tiled vs untiled.
- cluster: the mosaic in-process vs on a LocalCluster of --workers processes: same labels up to renumbering.
- rss: peak RSS of `predict IMAGE.zarr --instances` in a fresh process on a --rss-size² uint16 zarr
  (zarr in and out; the process's own peak, VmHWM).
- rss-npy: the same on a --rss-size² uint16 `.npy` (memory-mapped: its pages are read per tile;
  before issue 36 the whole file was loaded), with a 2048² `.npy` beside it for comparison.
  --rss-tiles K runs only K tiles spread over the image (all watershed blocks still run): memory
  comes from one tile and one block at a time, so K tiles show the peak in minutes instead of hours.
- throughput: tiles per second of the mosaic with 1 and with --workers workers (LocalCluster).
- cost: seconds per megapixel, in-process, for each of --sizes (synthetic zarr images).
Timings are wall clock on this machine; run it on a quiet machine and name the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft_export.data import synthetic_mosaic, synthetic_sample  # noqa: E402
from peft_export.evaluation.large import mean_segmentation_accuracy_large  # noqa: E402
from peft_export.predict.large import plan_large, run_large  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mosaic(size: int, seed: int = 0):
    return synthetic_mosaic(size, size, seed)


def write_zarr(path: Path, size: int, chunk: int = 1024) -> Path:
    """A size² uint16 zarr of nuclei written chunk by chunk (a pool of 16 samples, cycled)."""
    import zarr

    pool = [synthetic_sample(256, seed=s)[0] for s in range(16)]
    z = zarr.open_array(str(path), mode="w", shape=(size, size), chunks=(chunk, chunk), dtype="uint16", zarr_format=2)
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            hh, ww = min(chunk, size - y), min(chunk, size - x)
            block = np.block([[pool[(y // 256 + a + x // 256 + b) % 16] for b in range(-(-ww // 256))]
                              for a in range(-(-hh // 256))])
            z[y:y + hh, x:x + ww] = block[:hh, :ww]
    return path


def write_npy(path: Path, size: int, chunk: int = 1024) -> Path:
    """A size² uint16 .npy of the same nuclei as ``write_zarr``, written through a memory map (the
    benchmark never holds the image)."""
    pool = [synthetic_sample(256, seed=s)[0] for s in range(16)]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(size, size))
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            hh, ww = min(chunk, size - y), min(chunk, size - x)
            block = np.block([[pool[(y // 256 + a + x // 256 + b) % 16] for b in range(-(-ww // 256))]
                              for a in range(-(-hh // 256))])
            out[y:y + hh, x:x + ww] = block[:hh, :ww]
    out.flush()
    del out
    return path


def split_objects(pred: np.ndarray, gt: np.ndarray, frac: float = 0.2) -> int:
    """Ground-truth objects cut into >= 2 predicted objects, each piece >= ``frac`` of the object."""
    keep = (gt > 0) & (pred > 0)
    pairs, counts = np.unique(np.stack([gt[keep], pred[keep]]), axis=1, return_counts=True)
    area = np.bincount(gt.ravel())
    big = counts >= frac * area[pairs[0]]
    ids, n = np.unique(pairs[0][big], return_counts=True)
    return int((n >= 2).sum())


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def labels_of(path: Path) -> np.ndarray:
    import zarr

    return zarr.open_group(str(path), mode="r")["0"][:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mosaic", type=int, default=4096)
    ap.add_argument("--sizes", default="2048,4096,8192,16384")
    ap.add_argument("--rss-size", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tile", type=int, default=None)
    ap.add_argument("--halo", type=int, default=None)
    ap.add_argument("--rss-tiles", type=int, default=None,
                    help="rss, rss-npy: run only this many tiles, spread over the image (default: all)")
    ap.add_argument("--parts", default="mosaic,cluster,rss,cost",
                    help="which parts to run (comma list; cluster, rss and cost time things: run them on a quiet "
                         "machine; rss-workers: the --rss-size² run on a --workers LocalCluster, each worker's peak RSS)")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    unknown = parts - {"mosaic", "cluster", "rss", "rss-npy", "rss-workers", "cost"}
    if unknown:
        ap.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    opts = dict(tile=a.tile, halo=a.halo, overwrite=True)
    res = {"host": {"cpu": cpu_name(), "python": platform.python_version(), "load_average": os.getloadavg()},
           "tile": a.tile, "halo": a.halo}

    if parts & {"mosaic", "cluster"}:
        res.update(mosaic_and_cluster(a, work, opts, parts))
    if parts & {"rss", "rss-workers"}:
        write_zarr(work / "big.zarr", a.rss_size)  # written here, so a size of an earlier run is never reused
    if "rss" in parts:
        res["rss"] = peak_rss(a, work, work / "big.zarr", a.rss_size)
    if "rss-npy" in parts:
        res["rss_npy"] = []
        for size in sorted({2048, a.rss_size}):
            write_npy(work / f"big{size}.npy", size)
            res["rss_npy"].append(peak_rss(a, work, work / f"big{size}.npy", size))
    if "rss-workers" in parts:
        res["rss_workers"] = peak_rss_workers(a, work, opts)
    res["cost"] = cost_per_mpx(a, work, opts) if "cost" in parts else []
    (out / "bench_tiled.json").write_text(json.dumps(res, indent=1))
    lines = report_lines(res, a.workers)
    (out / "bench_tiled.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def mosaic_and_cluster(a, work: Path, opts: dict, parts: set) -> dict:
    """mosaic: tiled AIS on the whole mosaic vs each 256-px sample alone; cluster: the same run on
    LocalClusters of 1 and --workers processes (same labels? tiles per second)."""
    import zarr

    from peft_export.distributed import close, connect, run_jobs
    from peft_export.runtime import SamSession

    image, gt = mosaic(a.mosaic)
    zarr.open_array(str(work / "mosaic.zarr"), mode="w", shape=image.shape, chunks=(1024, 1024), dtype="uint16",
                    zarr_format=2)[:] = image
    t = time.perf_counter()
    job = plan_large(a.export, work / "mosaic.zarr", work / "tiled.zarr", **opts)
    rec = run_large(job)
    t_one_proc = time.perf_counter() - t
    tiled = labels_of(work / "tiled.zarr")
    session = SamSession(a.export)
    untiled = np.zeros_like(gt)
    k = 0
    for y in range(0, a.mosaic, 256):
        for x in range(0, a.mosaic, 256):
            lab, _ = session.segment_instances(image=image[y:y + 256, x:x + 256])
            untiled[y:y + 256, x:x + 256] = np.where(lab > 0, lab + k, 0)
            k += int(lab.max())
    res: dict = {}
    res["mosaic"] = {"size": a.mosaic, "tiles": rec["tiles"], "tile": rec["tile"], "scale": rec["scale"],
                     "msa_tiled": mean_segmentation_accuracy_large(tiled, gt)[0],
                     "msa_untiled_crops": mean_segmentation_accuracy_large(untiled, gt)[0],
                     "split_tiled": split_objects(tiled, gt), "split_untiled_crops": split_objects(untiled, gt)}

    # cluster: same labels; throughput 1 vs N workers
    through = {"in_process_s": t_one_proc}
    for n in (1, a.workers) if "cluster" in parts else ():
        client = connect(workers=n)
        try:
            job = plan_large(a.export, work / "mosaic.zarr", work / f"w{n}.zarr", **opts)
            t = time.perf_counter()
            run_jobs(client, [job])
            dt = time.perf_counter() - t
        finally:
            close(client)
        through[f"workers_{n}"] = {"seconds": dt, "tiles_per_s": rec["tiles"] / dt}
    if "cluster" in parts:
        through["speedup"] = through["workers_1"]["seconds"] / through[f"workers_{a.workers}"]["seconds"]
        res["throughput"] = through
        res["cluster_same_labels"] = same_up_to_renumbering(tiled, labels_of(work / f"w{a.workers}.zarr"))
    return res


RSS_RUN = """
import sys, time
import numpy as np
from peft_export.bench.stats import peak_rss_mb
from peft_export.predict.large import finish_large, plan_large, stages
export, image, out, tile, halo, k = sys.argv[1:7]
t = time.perf_counter()
job = plan_large(export, image, out, tile=None if tile == "None" else int(tile),
                 halo=None if halo == "None" else int(halo), overwrite=True)
for name, step, n in stages(job):
    ks = range(n) if n else [None]
    if name == "tiles" and k != "None":  # a sample of tiles spread over the image
        ks = sorted(set(np.linspace(0, n - 1, min(int(k), n)).round().astype(int).tolist()))
    for i in ks:
        step(job) if i is None else step(job, i)
finish_large(job)
print(time.perf_counter() - t, peak_rss_mb())
"""


def peak_rss(a, work: Path, image: Path, size: int) -> dict:
    """Peak RSS (VmHWM) of a fresh process running the --instances steps on ``image`` (output
    zarr), and its seconds (run alone on a quiet machine, also the cost per megapixel at that size;
    not with --rss-tiles)."""
    out = work / f"{image.stem}_out.zarr"
    proc = subprocess.run([sys.executable, "-c", RSS_RUN, a.export, str(image), str(out), str(a.tile), str(a.halo),
                           str(a.rss_tiles)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"rss: the predict process failed: {proc.stderr.strip().splitlines()[-1:]}")
    seconds, rss_mb = proc.stdout.split()[-2:]
    mpx = size ** 2 / 1e6
    return {"image": image.name, "size": size, "image_mb": size ** 2 * 2 / 1e6, "peak_rss_mb": float(rss_mb),
            "seconds": float(seconds), "s_per_mpx": float(seconds) / mpx, "tiles_run": a.rss_tiles or "all"}


def _worker_peak_rss_mb() -> float:
    from peft_export.bench.stats import peak_rss_mb

    return peak_rss_mb()  # VmHWM: a forked worker's ru_maxrss would start at its parent's peak


def peak_rss_workers(a, work: Path, opts: dict) -> dict:
    """The --rss-size² zarr on a LocalCluster of --workers fresh worker processes: each one's peak RSS."""
    from peft_export.distributed import close, connect, run_jobs

    client = connect(workers=a.workers)
    try:
        t = time.perf_counter()
        run_jobs(client, [plan_large(a.export, work / "big.zarr", work / "big_out_workers.zarr", **opts)])
        seconds = time.perf_counter() - t
        peaks = client.run(_worker_peak_rss_mb)
    finally:
        close(client)
    return {"size": a.rss_size, "workers": a.workers, "seconds": seconds,
            "peak_rss_mb_per_worker": sorted(peaks.values())}


def cost_per_mpx(a, work: Path, opts: dict) -> list[dict]:
    """Seconds per megapixel, in-process, for each of --sizes."""
    cost = []
    for size in [int(s) for s in a.sizes.split(",")]:
        write_zarr(work / f"s{size}.zarr", size)
        t = time.perf_counter()
        run_large(plan_large(a.export, work / f"s{size}.zarr", work / f"s{size}_out.zarr", **opts))
        dt = time.perf_counter() - t
        cost.append({"size": size, "seconds": dt, "s_per_mpx": dt / (size * size / 1e6)})
    return cost


def report_lines(res: dict, workers: int) -> list[str]:
    load = ", ".join(f"{v:.1f}" for v in res["host"]["load_average"])
    lines = [f"# Tiled segmentation ({res['host']['cpu']}; load average {load} at the start)", ""]
    if "mosaic" in res:
        m = res["mosaic"]
        lines.append(f"mosaic {m['size']}² ({m['tiles']} tiles of {m['tile']} px, scale {m['scale']:g}): mSA tiled "
                     f"{m['msa_tiled']:.3f} vs untiled 256-px crops {m['msa_untiled_crops']:.3f}; objects split: "
                     f"{m['split_tiled']} tiled, {m['split_untiled_crops']} untiled crops")
    if "throughput" in res:
        t = res["throughput"]
        lines += [f"in-process vs {workers}-worker LocalCluster: same labels up to renumbering: {res['cluster_same_labels']}",
                  f"throughput: 1 worker {t['workers_1']['tiles_per_s']:.2f} tiles/s, {workers} workers "
                  f"{t[f'workers_{workers}']['tiles_per_s']:.2f} tiles/s (x{t['speedup']:.2f})"]
    for r in ([res["rss"]] if "rss" in res else []) + res.get("rss_npy", []):
        lines.append(f"peak RSS {r['image']} {r['size']}² uint16 ({r['image_mb']:.0f} MB of pixels, tiles run: "
                     f"{r['tiles_run']}): {r['peak_rss_mb']:.0f} MB; {r['seconds']:.0f} s, {r['s_per_mpx']:.3f} s / "
                     "megapixel")
    if "rss_workers" in res:
        r = res["rss_workers"]
        lines.append(f"peak RSS per worker, {r['size']}² on {r['workers']} workers: "
                     + ", ".join(f"{m:.0f} MB" for m in r["peak_rss_mb_per_worker"]) + f" ({r['seconds']:.0f} s)")
    if res["cost"]:
        lines += ["", "| image | seconds | s / megapixel |", "|---|---|---|"]
        lines += [f"| {c['size']}² | {c['seconds']:.1f} | {c['s_per_mpx']:.3f} |" for c in res["cost"]]
    return lines


if __name__ == "__main__":
    main()
