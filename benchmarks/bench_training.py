"""Training cost per PEFT method: seconds per step and peak memory, one fresh process per method.

    python benchmarks/bench_training.py --model vit_b --image-size 512 --steps 3 --device cpu
    python benchmarks/bench_training.py --model vit_t --image-size 1024 --steps 3 --device cpu   # MobileSAM
    python benchmarks/bench_training.py --model vit_t --image-size 1024 --steps 5 --encoder-only  # encoder's share

Every method trains on the same synthetic data, model, patch size and prompts (the loop of
``peftexport finetune``, no validation). Peak memory is the process's peak RSS on the CPU or
``torch.cuda.max_memory_allocated`` on a GPU, read after the last step. Prints one markdown
table with ratios to full finetuning (and ``--json`` writes the raw numbers). ``--encoder-only`` times
the image encoder's forward + backward alone: the ratios a method would reach with a free decoder.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _encoder_worker(args: argparse.Namespace) -> None:
    """``--encoder-only``: the image encoder's share of a step alone (the forward, without autograd through
    the frozen prefix as finetune runs it, and the backward of a random gradient on the embedding): what a
    method would cost if the mask decoder and the loss were free."""
    warnings.simplefilter("ignore")
    import torch

    from peft_export.bench.stats import peak_rss_mb
    from peft_export.models import random_sam
    from peft_export.models.encoder_split import encode_with_frozen_prefix, first_trainable_block
    from peft_export.peft import PeftConfig
    from peft_export.peft.apply import apply_peft, count_trainable_parameters
    from peft_export.training.host_memory import keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options = dict(METHODS[args.worker][1])
    sam = apply_peft(random_sam(args.model, args.image_size, seed=0), PeftConfig(options.pop("peft"), **options))
    sam = sam.to(device)
    first = first_trainable_block(sam)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, args.image_size, args.image_size, generator=g).to(device)
    grad = None

    def step() -> None:
        nonlocal grad
        emb = encode_with_frozen_prefix(sam, x, first)
        if grad is None:
            grad = torch.randn(emb.shape, generator=g).to(device)
        if emb.requires_grad:
            emb.backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with keep_freed_memory() if device.type == "cpu" else contextlib.nullcontext():  # as finetune on the CPU
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else peak_rss_mb())
    counts = count_trainable_parameters(sam)
    print("RESULT " + json.dumps({"method": args.worker, "seconds_per_step": sum(times) / len(times),
                                  "peak_memory_mb": peak, "trainable_encoder": counts["image_encoder"],
                                  "trainable_total": counts["total"]}))


def _run_one(method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--model", args.model, "--image-size", str(args.image_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--objects", str(args.objects), "--sub-iterations", str(args.sub_iterations),
           "--precision", args.precision, "--threads", str(args.threads)]
    if args.patch_size:
        cmd += ["--patch-size", str(args.patch_size)]
    if args.objects_per_pass:
        cmd += ["--objects-per-pass", str(args.objects_per_pass)]
    if args.encoder_only:
        cmd += ["--encoder-only"]
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
    p.add_argument("--encoder-only", action="store_true",
                   help="time only the image encoder's forward + backward (no decoder, no loss, no optimizer)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        (_encoder_worker if args.encoder_only else _worker)(args)
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
    if args.encoder_only:
        recipe = (f"image encoder only (forward + backward of a random embedding gradient; no decoder, loss or "
                  f"optimizer), {args.model} at {args.image_size}px, device {args.device}, fp32, batch 1")
    else:
        recipe = (f"{args.model} at {args.image_size}px, patch {args.patch_size or args.image_size}, device {args.device}, "
                  f"{args.precision}, batch 1, {args.objects} objects ({args.objects_per_pass or 'default'} per decoder "
                  f"pass), {args.sub_iterations} sub-iteration(s)")
    print(f"\n{recipe}, mean of {args.steps} steps after {args.warmup} warm-up ({time.perf_counter() - t0:.0f} s total)\n")
    print(format_table(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
