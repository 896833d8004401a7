"""Segment-everything, old runtime vs new, each timing in a fresh process (encoder excluded).

    python benchmarks/bench_everything.py                      # vit_b at 512 and tiny, 32x32 grid
    python benchmarks/bench_everything.py --models tiny --points-per-side 16    # a quick look

Cases, each run by a fresh Python process (under ``flock LOCK`` with ``--lock``):

- ``old``: the runtime as of ``--old-ref`` (git archive of that commit's ``peft_export``):
  ``decoder_lowres`` for every prompt, every candidate upsampled to the full image;
- ``new-lowres``: this runtime on ``decoder_lowres`` (what exports made before the split
  decoder get);
- ``new``: this runtime on the split decoder graphs.

Weights are random (seeded) and the image is a synthetic 512x512 nuclei image. Random
decoders predict IoUs far below the default 0.88, so with the default thresholds no mask
survives and the times are the decoder's; with ``zero`` thresholds every candidate is
upsampled, thresholded and goes through NMS (the most work the filters can leave).
Prints per model and thresholds the seconds of each case, new/old speed-up, the objects
found and the agreement (mSA) of the new labels with the old, the CPU model and the load
average before and after. Writes OUT/bench_everything.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import warnings
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "0af1b585d506b974f4e4f8ae69665027bce2f878"  # the runtime before the split decoder
THRESHOLDS = {
    "default": dict(pred_iou_thresh=0.88, stability_score_thresh=0.95),
    "zero": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0),
}
CASES = ("old", "new-lowres", "new")
MODEL_SIZES = {"vit_b": 512, "tiny": 256}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- child: one timing in a fresh process ---------------------------------------------------------


def child(spec: dict) -> dict:
    sys.path.insert(0, spec["src"])
    import numpy as np

    from peft_export.runtime import SamSession

    import peft_export

    assert Path(peft_export.__file__).resolve().is_relative_to(Path(spec["src"]).resolve()), peft_export.__file__
    image = np.load(spec["image"])
    session = SamSession(spec["export"])
    emb = session.encode(image)
    options = dict(spec["options"])
    if spec["decoder"]:
        options["decoder"] = spec["decoder"]
    session.segment_everything(embedding=emb, **{**options, "points_per_side": 2})  # warm-up: graph loading
    before = load()
    t = time.perf_counter()
    labels, records = session.segment_everything(embedding=emb, **options)
    seconds = time.perf_counter() - t
    np.save(spec["labels"], labels)
    from peft_export.bench.stats import peak_rss_mb

    return {"seconds": seconds, "objects": len(records), "load_before": before, "load_after": load(),
            "peak_rss_mb": peak_rss_mb(),  # VmHWM: ru_maxrss would start at the parent's peak
            "summary": getattr(records, "summary", None)}


# ---- parent -----------------------------------------------------------------------------------------


def old_source(ref: str, work: Path) -> Path:
    """``peft_export`` as of ``ref``, unpacked under work/old-<ref>."""
    dest = work / f"old-{ref[:12]}"
    if not (dest / "peft_export" / "runtime" / "session.py").is_file():
        data = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "peft_export"], check=True,
                              capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
    return dest


def make_export(model: str, work: Path) -> Path:
    """A seeded random ``model`` exported with this code (split decoder included), cached in work."""
    out = work / f"export-{model}-{MODEL_SIZES[model]}"
    if (out / "manifest.json").is_file():
        return out
    sys.path.insert(0, str(ROOT))
    from peft_export.export import merge_and_export
    from peft_export.models import load_sam
    from peft_export.peft.adapters import AdaptedModel

    warnings.filterwarnings("ignore", message="no checkpoint given")
    sam, base = load_sam(model, None, MODEL_SIZES[model], seed=0, warn_random=False)
    # meta_decoder: Meta's decoder as well, as the old code's exports had it (decoder_lowres is always written)
    merge_and_export(AdaptedModel(sam.eval(), None, base), out, precisions=("fp32",), overwrite=True, progress=False,
                     meta_decoder=True)
    return out


def run_child(spec: dict, lock: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    if lock:
        cmd = ["flock", lock] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['case']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a: Path, b: Path) -> float:
    """mSA of labels b against labels a (1.0: the same objects)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from peft_export.evaluation.metrics import mean_segmentation_accuracy

    la, lb = np.load(a), np.load(b)
    if la.max() == 0 and lb.max() == 0:
        return 1.0
    return float(mean_segmentation_accuracy(lb, la))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_b,tiny", help=f"comma list of {', '.join(MODEL_SIZES)}")
    ap.add_argument("--thresholds", default="default,zero", help=f"comma list of {', '.join(THRESHOLDS)}")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--image", type=int, default=512, help="side of the synthetic test image")
    ap.add_argument("--old-ref", default=OLD_REF, help="git commit of the old runtime")
    ap.add_argument("--lock", default="", help="a flock(1) file held around each timing, on a machine shared with other benchmarks (default: none)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per timing")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_everything"), help="exports, old code, labels")
    ap.add_argument("--out", type=Path, default=Path("bench_everything_out"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from peft_export.bench.stats import device_info
    from peft_export.data.synthetic import synthetic_sample

    models = [m for m in args.models.split(",") if m]
    levels = [t for t in args.thresholds.split(",") if t]
    for m in models:
        if m not in MODEL_SIZES:
            ap.error(f"--models: unknown {m!r}")
    for t in levels:
        if t not in THRESHOLDS:
            ap.error(f"--thresholds: unknown {t!r}")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = device_info()
    log(f"{machine['cpu']}, {machine['cpu_count_usable']} cores; load {load()}")
    old_src = old_source(args.old_ref, args.work)
    image_path = args.work / f"nuclei{args.image}.npy"
    np.save(image_path, synthetic_sample(args.image, seed=0)[0])
    results = []
    for model in models:
        log(f"export {model} at {MODEL_SIZES[model]} (cached in {args.work})")
        export = make_export(model, args.work)
        for level in levels:
            options = dict(points_per_side=args.points_per_side, **THRESHOLDS[level])
            row = {"model": model, "image_size": MODEL_SIZES[model], "thresholds": level, "options": options}
            for case in CASES:
                spec = {"case": case, "src": str(old_src if case == "old" else ROOT), "export": str(export),
                        "image": str(image_path), "options": options,
                        "decoder": "lowres" if case == "new-lowres" else ("split" if case == "new" else None),
                        "labels": str(args.work / f"labels-{model}-{level}-{case}.npy")}
                row[case] = run_child(spec, args.lock, args.timeout)
                log(f"{model} {level} {case}: {row[case]['seconds']:.2f} s, {row[case]['objects']} objects, "
                    f"load {row[case]['load_before']} -> {row[case]['load_after']}")
            labels = {case: args.work / f"labels-{model}-{level}-{case}.npy" for case in CASES}
            for case in ("new-lowres", "new"):
                row[f"{case} speed-up"] = row["old"]["seconds"] / row[case]["seconds"]
                row[f"{case} mSA vs old"] = agreement(labels["old"], labels[case])
            results.append(row)
    report = {"machine": machine, "load_end": load(), "points_per_side": args.points_per_side,
              "image": args.image, "old_ref": args.old_ref, "results": results,
              "date": time.strftime("%Y-%m-%d")}
    (args.out / "bench_everything.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    head = (f"segment-everything, {report['points_per_side']}x{report['points_per_side']} grid, "
            f"{report['image']}x{report['image']} image, encoder excluded; {report['machine']['cpu']} "
            f"({report['machine']['cpu_count_usable']} cores), {report['date']}")
    cols = f"{'model':<7}{'thresholds':<11}{'old s':>9}{'new-lowres s':>14}{'new s':>9}{'speed-up':>10}" \
           f"{'lowres speed-up':>17}{'objects old/new':>17}{'mSA new vs old':>16}  load before -> after"
    lines = [head, cols, "-" * len(cols)]
    for r in report["results"]:
        lines.append(
            f"{r['model']:<7}{r['thresholds']:<11}{r['old']['seconds']:>9.3g}{r['new-lowres']['seconds']:>14.3g}"
            f"{r['new']['seconds']:>9.3g}{r['new speed-up']:>9.3g}x{r['new-lowres speed-up']:>16.3g}x"
            f"{str(r['old']['objects']) + '/' + str(r['new']['objects']):>17}{r['new mSA vs old']:>16.4f}"
            f"  {r['old']['load_before']} -> {r['new']['load_after']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
