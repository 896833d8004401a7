"""Training cost per PEFT method: seconds per step and peak memory, one fresh process per method.

    python benchmarks/bench_training.py --model vit_b --image-size 512 --steps 3 --device cpu
    python benchmarks/bench_training.py --model vit_t --image-size 1024 --steps 3 --device cpu   # MobileSAM

Every method trains on the same synthetic data, model, patch size and prompts (the loop of
``peftexport finetune``, no validation). Peak memory is the process's peak RSS on the CPU or
``torch.cuda.max_memory_allocated`` on a GPU, read after the last step. Prints one markdown
table with ratios to full finetuning (and ``--json`` writes the raw numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# key: (label in the table, TrainConfig options)
METHODS = {
    "freeze-encoder": ("freeze encoder", dict(peft="freeze-encoder")),
    "late-lora": ("late LoRA (q,k,v,mlp; r32; late blocks)",
                  dict(peft="lora", blocks="late", rank=32, targets=("q", "k", "v", "mlp"))),
    "lora": ("LoRA (q,v; r32; all blocks)", dict(peft="lora", blocks="all", rank=32, targets=("q", "v"))),
    "fact": ("FacT (r16; all blocks)", dict(peft="fact", blocks="all", rank=16)),
    "ssf": ("SSF (all blocks)", dict(peft="ssf", blocks="all")),
    "adaptformer": ("AdaptFormer (bottleneck 64; all blocks)", dict(peft="adaptformer", blocks="all", bottleneck=64)),
    "full": ("full finetuning", dict(peft="full", blocks="all")),
}
REFERENCE = "full"


def _worker(args: argparse.Namespace) -> None:
    warnings.simplefilter("ignore")
    import torch

    from peft_export.data import make_demo_data
    from peft_export.training import TrainConfig, finetune
    from peft_export.training.plots import read_log

    if args.threads:
        torch.set_num_threads(args.threads)
    patch = args.patch_size or args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_demo_data(data, n_images=2, size=patch, seed=0)
        out = Path(tmp) / "run"
        summary = finetune(TrainConfig(
            out=str(out), data=str(data), model_type=args.model, image_size=args.image_size, patch_size=patch,
            iterations=args.warmup + args.steps, val_fraction=0.0, validate_at_start=False, lr=1e-5,
            objects_per_image=args.objects, sub_iterations=args.sub_iterations, device=args.device,
            objects_per_pass=args.objects_per_pass,
            precision=args.precision, progress=False, seed=0, **METHODS[args.worker][1]))
        steps = [e for e in read_log(out / "train_log.jsonl") if e["type"] == "step"][args.warmup:]
    print("RESULT " + json.dumps({
        "method": args.worker,
        "seconds_per_step": sum(e["seconds"] for e in steps) / len(steps),
        "peak_memory_mb": steps[-1]["peak_memory_mb"],
        "trainable_encoder": summary["trainable_parameters"]["image_encoder"],
        "trainable_total": summary["trainable_parameters"]["total"],
    }))


def _run_one(method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--model", args.model, "--image-size", str(args.image_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--objects", str(args.objects), "--sub-iterations", str(args.sub_iterations),
           "--precision", args.precision, "--threads", str(args.threads)]
    if args.patch_size:
        cmd += ["--patch-size", str(args.patch_size)]
    if args.objects_per_pass:
        cmd += ["--objects-per-pass", str(args.objects_per_pass)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    ref = next((r for r in results if r["method"] == REFERENCE), None)
    mem = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    head = (f"| method | trainable (encoder) | s / step | {mem} (MB) | time vs full | memory vs full |\n"
            "|---|---:|---:|---:|---:|---:|")
    rows = []
    for r in results:
        t = f"{r['seconds_per_step'] / ref['seconds_per_step']:.2f}" if ref else "-"
        m = f"{r['peak_memory_mb'] / ref['peak_memory_mb']:.2f}" if ref else "-"
        rows.append(f"| {METHODS[r['method']][0]} | {r['trainable_encoder']:,} | {r['seconds_per_step']:.2f} | "
                    f"{r['peak_memory_mb']:.0f} | {t} | {m} |")
    return "\n".join([head] + rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--patch-size", type=int, default=None, help="default: the image size")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--objects", type=int, default=5, help="objects per image and step")
    p.add_argument("--sub-iterations", type=int, default=1)
    p.add_argument("--objects-per-pass", type=int, default=None,
                   help="objects per decoder pass (default: finetune's; on the CPU 2 at 1024 px)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated keys: " + ", ".join(METHODS))
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s): {unknown}")
    results = []
    t0 = time.perf_counter()
    for m in methods:
        r = _run_one(m, args)
        print(f"{m}: {r['seconds_per_step']:.2f} s/step, {r['peak_memory_mb']:.0f} MB", file=sys.stderr, flush=True)
        results.append(r)
    print(f"\n{args.model} at {args.image_size}px, patch {args.patch_size or args.image_size}, device {args.device}, "
          f"{args.precision}, batch 1, {args.objects} objects ({args.objects_per_pass or 'default'} per decoder pass), "
          f"{args.sub_iterations} sub-iteration(s), "
          f"mean of {args.steps} steps after {args.warmup} warm-up ({time.perf_counter() - t0:.0f} s total)\n")
    print(format_table(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
