"""How the learning rate of decoder-only LoRA (``peftexport improve``) shapes its held-out gain, on data
that ``benchmarks/bench_improve.py`` never scores (quality only; a default is chosen from this, not from
the benchmark's own held-out objects).

    python benchmarks/bench_improve.py --out OUT --models tiny      # makes OUT/tiny/start (the starting export)
    python benchmarks/improve_lr_study.py --out OUT --lrs 1e-3,3e-3,1e-2 --data-seeds 21,31

For each data seed: 8 new demo images of other nuclei (seeds other than the benchmark's 11), darkened by the
benchmark's gamma, a quarter of their objects held out; for each learning rate: ``improve_export`` from the
benchmark's starting export (LoRA r8 on every decoder layer, 8 objects a step, one corrective round), with the
held-out box Dice of the torch model every ``--curve-every`` steps. Each run is a fresh process. Printed: the
gain over step 0 per learning rate and step, averaged over the data seeds (and each seed's), and the final gain
of the exports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_improve import _darken, _spec  # noqa: E402  (the benchmark's data recipe and models)


def _one(args: argparse.Namespace) -> None:
    from peft_export.data import make_demo_data
    from peft_export.improve import improve_export

    root = args.out / args.model
    size = _spec(args.model)[1]
    data = root / f"lr_study_data_{args.data_seed}"
    if not (data / "labels").is_dir():
        make_demo_data(data, n_images=8, size=size, seed=args.data_seed)
        _darken(data / "images")
    out = root / f"lr_study_{args.data_seed}_{args.lr:g}"
    result = improve_export(root / "start" / "export", data / "images", data / "labels", out, steps=args.steps,
                            lr=args.lr, rank=8, holdout=0.25, objects_per_image=8, sub_iterations=1,
                            precisions=("fp32",), progress=False, seed=0, curve_every=args.curve_every,
                            overwrite=True)
    points = result["training"]["curve"]["points"]
    print("RESULT " + json.dumps({"lr": args.lr, "data_seed": args.data_seed,
                                  "curve": [(p["step"], p["box_dice"]) for p in points],
                                  "before": result["before"]["fp32"]["box_dice"],
                                  "after": result["after"]["fp32"]["box_dice"]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="bench_improve.py's working folder")
    p.add_argument("--model", default="tiny", help="as bench_improve.py's --models: tiny, vit_t, vit_t@256")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--data-seeds", default="21,31")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--curve-every", type=int, default=3)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--data-seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    _spec(args.model)
    if args.lr is not None:
        warnings.simplefilter("ignore")
        _one(args)
        return
    if not (args.out / args.model / "start" / "export" / "manifest.json").is_file():
        raise SystemExit(f"{args.out / args.model / 'start' / 'export'}: no starting export; run "
                         f"benchmarks/bench_improve.py --out {args.out} --models {args.model} first")
    runs = []
    for seed in [int(s) for s in args.data_seeds.split(",")]:
        for lr in [float(x) for x in args.lrs.split(",")]:
            cmd = [sys.executable, __file__, "--out", str(args.out), "--model", args.model, "--lr", repr(lr),
                   "--data-seed", str(seed), "--steps", str(args.steps), "--curve-every", str(args.curve_every)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"lr {lr:g}, data seed {seed} failed:\n{proc.stderr[-3000:]}")
            run = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
            print(f"lr {lr:g} seed {seed}: " + " ".join(f"{s}:{d - run['curve'][0][1]:+.3f}" for s, d in run["curve"]),
                  file=sys.stderr, flush=True)
            runs.append(run)
    lrs = list(dict.fromkeys(r["lr"] for r in runs))
    steps = [s for s, _ in runs[0]["curve"]]
    print(f"held-out box Dice gain over step 0 (torch), mean of data seeds {args.data_seeds}; model {args.model}\n")
    print("| lr | " + " | ".join(f"step {s}" for s in steps) + " | export gain |")
    print("|---:|" + "---:|" * (len(steps) + 1))
    for lr in lrs:
        mine = [r for r in runs if r["lr"] == lr]
        gains = [sum(r["curve"][i][1] - r["curve"][0][1] for r in mine) / len(mine) for i in range(len(steps))]
        final = sum(r["after"] - r["before"] for r in mine) / len(mine)
        print(f"| {lr:g} | " + " | ".join(f"{g:+.3f}" for g in gains) + f" | {final:+.3f} |")


if __name__ == "__main__":
    main()
