"""The decoder family, before vs after, in one run: export size and time, predict with mask_input, segment-everything.

    python benchmarks/bench_decoder_family.py                                 # vit_b at 1024 and tiny
    python benchmarks/bench_decoder_family.py --models tiny --repeats 5 --points-per-side 8   # a quick look

Each case runs in a fresh Python process (under ``flock LOCK`` with ``--lock``):

- ``before``: the code as of ``--old-ref`` (git archive of that commit's ``peft_export``): its export
  (``decoder``, ``decoder_lowres``, the split graphs without mask input, ``click_decoder``), and its
  runtime on it: ``predict`` with a mask input runs ``decoder_lowres`` (the image side projected on
  every call), segment-everything the split graphs;
- ``after``: this code, ``merge_and_export(meta_decoder=False)`` (the default export: the family +
  ``click_decoder``, no Meta graph), and this runtime on it: ``split_image`` once per image,
  ``split_prompts`` (with the mask input) + ``split_masks`` per call.

Per model: export seconds and bytes (all files of the export directory), the median ms of one
``predict`` in SamPredictor's iterative loop (one point, the previous low-res logits fed back; the
first call's ``split_image`` is not in the loop: it runs at the image's first prompt), and the
seconds of one segment-everything (``--points-per-side`` grid, thresholds 0: every candidate
kept, so the masks' share is in). Weights are random (seeded); the image is a synthetic nuclei
image. Writes OUT/bench_decoder_family.json and prints a table with the CPU and the load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_everything import load, log, old_source  # noqa: E402  (stdlib only: safe before _use_source)

ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "6ddda2543cb600d2a8c1d71a98ccf26713cee2ab"  # the code before the family took the mask input
MODEL_SIZES = {"vit_b": 1024, "tiny": 256}  # vit_b at its real size: the image side of the decoder is 64x64
SIDES = ("before", "after")


# ---- children: one measurement in a fresh process -------------------------------------------------


def _use_source(src: str) -> None:
    sys.path.insert(0, src)
    import peft_export

    assert Path(peft_export.__file__).resolve().is_relative_to(Path(src).resolve()), peft_export.__file__


def child_export(spec: dict) -> dict:
    _use_source(spec["src"])
    import inspect

    from peft_export.export import merge_and_export
    from peft_export.models import load_sam
    from peft_export.peft.adapters import AdaptedModel

    warnings.filterwarnings("ignore", message="no checkpoint given")
    sam, base = load_sam(spec["model"], None, spec["image_size"], seed=0, warn_random=False)
    kw = {"meta_decoder": False} if "meta_decoder" in inspect.signature(merge_and_export).parameters else {}
    before = load()
    t = time.perf_counter()
    merge_and_export(AdaptedModel(sam.eval(), None, base), spec["export"], precisions=("fp32",), overwrite=True,
                     progress=False, **kw)
    seconds = time.perf_counter() - t
    files = {p.name: p.stat().st_size for p in Path(spec["export"]).iterdir() if p.is_file()}
    return {"seconds": seconds, "bytes": sum(files.values()), "files": files, "load_before": before,
            "load_after": load()}


def child_predict(spec: dict) -> dict:
    _use_source(spec["src"])
    import numpy as np

    from peft_export.runtime import SamSession

    image = np.load(spec["image"])
    session = SamSession(spec["export"])
    session.set_image(image)
    h, w = image.shape[:2]
    point = dict(point_coords=np.array([[w * 0.4, h * 0.55]]), point_labels=np.array([1]))
    _, _, low = session.predict(**point, multimask_output=False)  # the image's first prompt (+ warm-up)
    _, _, low = session.predict(**point, mask_input=low[:1], multimask_output=False)
    before, times = load(), []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        _, _, low = session.predict(**point, mask_input=low[:1], multimask_output=False)
        times.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times), "repeats": len(times),
            "load_before": before, "load_after": load(), "decoder_used": session.describe()["decoder_used"]}


def child_everything(spec: dict) -> dict:
    _use_source(spec["src"])
    import numpy as np

    from peft_export.runtime import SamSession

    image = np.load(spec["image"])
    session = SamSession(spec["export"])
    emb = session.encode(image)
    options = dict(points_per_side=spec["points_per_side"], pred_iou_thresh=0.0, stability_score_thresh=0.0)
    session.segment_everything(embedding=emb, **{**options, "points_per_side": 2})  # warm-up: graph loading
    before = load()
    t = time.perf_counter()
    _, records = session.segment_everything(embedding=emb, **options)
    return {"seconds": time.perf_counter() - t, "objects": len(records), "load_before": before, "load_after": load()}


CHILDREN = {"export": child_export, "predict": child_predict, "everything": child_everything}


# ---- parent -----------------------------------------------------------------------------------------


def run_child(kind: str, spec: dict, lock: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    if lock:
        cmd = ["flock", lock] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {spec['side']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_b,tiny", help=f"comma list of {', '.join(MODEL_SIZES)}")
    ap.add_argument("--repeats", type=int, default=50, help="predict calls timed (median)")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--image", type=int, default=512, help="side of the synthetic test image")
    ap.add_argument("--old-ref", default=OLD_REF, help="git commit of the code before the family")
    ap.add_argument("--lock", default="", help="a flock(1) file held around each case (default: none)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_decoder_family"), help="exports, old code")
    ap.add_argument("--out", type=Path, default=Path("bench_decoder_family_out"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return 0

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from peft_export.bench.stats import device_info
    from peft_export.data.synthetic import synthetic_sample

    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODEL_SIZES:
            ap.error(f"--models: unknown {m!r}")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = device_info()
    log(f"{machine['cpu']}, {machine['cpu_count_usable']} cores; load {load()}")
    src = {"before": str(old_source(args.old_ref, args.work)), "after": str(ROOT)}
    img = synthetic_sample(args.image, seed=0)[0]
    image_path = args.work / f"nuclei{args.image}.npy"
    np.save(image_path, np.repeat((img / max(img.max(), 1) * 255).astype(np.uint8)[..., None], 3, -1))
    results = []
    for model in models:
        row = {"model": model, "image_size": MODEL_SIZES[model]}
        for side in SIDES:
            spec = {"side": side, "src": src[side], "model": model, "image_size": MODEL_SIZES[model],
                    "export": str(args.work / f"export-{model}-{side}"), "image": str(image_path),
                    "repeats": args.repeats, "points_per_side": args.points_per_side}
            row[side] = {kind: run_child(kind, spec, args.lock, args.timeout) for kind in CHILDREN}
            r = row[side]
            log(f"{model} {side}: export {r['export']['seconds']:.1f} s {r['export']['bytes'] / 1e6:.1f} MB, "
                f"predict+mask {r['predict']['median_ms']:.2f} ms ({r['predict']['decoder_used']}), "
                f"everything {r['everything']['seconds']:.2f} s ({r['everything']['objects']} objects)")
        results.append(row)
    report = {"machine": machine, "load_end": load(), "old_ref": args.old_ref, "repeats": args.repeats,
              "points_per_side": args.points_per_side, "image": args.image, "results": results,
              "date": time.strftime("%Y-%m-%d")}
    (args.out / "bench_decoder_family.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    head = (f"decoder family, before ({report['old_ref'][:12]}) vs after; predict: median of {report['repeats']} "
            f"with mask_input; everything: {report['points_per_side']}^2 points, {report['image']}^2 image; "
            f"{report['machine']['cpu']} ({report['machine']['cpu_count_usable']} cores), {report['date']}")
    cols = (f"{'model':<7}{'side':<8}{'export s':>10}{'export MB':>11}{'predict ms':>12}{'everything s':>14}"
            f"{'objects':>9}  load before -> after")
    lines = [head, cols, "-" * len(cols)]
    for r in report["results"]:
        for side in SIDES:
            x = r[side]
            lines.append(f"{r['model']:<7}{side:<8}{x['export']['seconds']:>10.1f}{x['export']['bytes'] / 1e6:>11.1f}"
                         f"{x['predict']['median_ms']:>12.2f}{x['everything']['seconds']:>14.3g}"
                         f"{x['everything']['objects']:>9}  {x['export']['load_before']} -> {x['everything']['load_after']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
