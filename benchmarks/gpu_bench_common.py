"""What gpu_bench.py and gpu_bench_sam2.py share: the LoRA configs, parity gates, timing and formatting.

Its own module so that gpu_bench.py (which hands SAM 2 to gpu_bench_sam2.py) and gpu_bench_sam2.py do not
import each other.
"""

from __future__ import annotations

import sys
import time

# Parity gates: the candidate's encoder output vs the reference's, same input and precision.
GATES = {"fp32": {"max_rel": 1e-3, "cosine": 0.99999}, "bf16": {"max_rel": None, "cosine": 0.999}}
MODELS = {  # name -> LoRA config (None: the plain base model)
    "base": None,
    "lora_qv": dict(method="lora", rank=32, targets=("q", "v"), blocks="all"),
    "late_lora": dict(method="lora", rank=32, targets=("q", "k", "v", "mlp"), blocks="late"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def time_calls(fn, args, device) -> tuple[dict, float | None]:
    """Warm up, then time ``args.iterations`` calls (CUDA events on CUDA); returns summary and peak MB."""
    import torch

    from peft_export.bench.stats import summarize_timings

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for _ in range(args.warmup):
            fn()
        seconds = []
        for _ in range(args.iterations):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1000.0)
            else:
                t = time.perf_counter()
                fn()
                seconds.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return summarize_timings(seconds), peak


def _parity(candidate, reference, precision: str) -> dict:
    import torch

    c, r = candidate.double().flatten(), reference.double().flatten()
    stats = {"max_rel": float((c - r).abs().max() / r.abs().max().clamp_min(1e-12)),
             "cosine": float(torch.nn.functional.cosine_similarity(c, r, dim=0)), "finite": bool(torch.isfinite(c).all())}
    gate = GATES[precision]
    stats["passed"] = stats["finite"] and stats["cosine"] >= gate["cosine"] and (
        gate["max_rel"] is None or stats["max_rel"] <= gate["max_rel"])
    stats["gate"] = gate
    return stats


def _fmt(x, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def timing_device(args):
    """``args.device`` as a torch device with fp32 meaning fp32 (TF32 off; bf16 is its own case), and whether
    bf16 runs natively there; (None, False) when CUDA was asked for and torch sees none."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA device", file=sys.stderr)
        return None, False
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return device, device.type == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False)


def build_logged(args, build_models, t_start: float):
    """``build_models(args)`` (base + LoRA, merged and unmerged), logged with the time since ``t_start`` (the
    run's start: its budget counts the build); makes ``args.out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    models = build_models(args)
    log(f"built {args.model} base + LoRA (q,v all blocks; q,k,v,mlp late blocks), merged and unmerged, "
        f"in {time.perf_counter() - t_start:.1f} s")
    return models


def case_table(result: dict) -> list[str]:
    """The markdown head and the per-case table of a gpu_bench result (``format_markdown`` of either script)."""
    lines = [f"# GPU benchmark: {result['config']['model']} at {result['config']['image_size']} px", "",
             f"{result['device']}; torch {result['versions'].get('torch')}; {result['created']}", "",
             "| case | status | p50 ms | p90 ms | per image ms | peak MB | parity (cosine) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for c in result["cases"]:
        t = c.get("timing") or {}
        per = t["median_ms"] / c["batch"] if t else None
        cos = (c.get("parity") or {}).get("cosine")
        lines.append(f"| {c['name']} | {c['status']}{': ' + c['reason'] if c.get('reason') else ''} | "
                     f"{_fmt(t.get('median_ms'))} | {_fmt(t.get('p90_ms'))} | {_fmt(per)} | "
                     f"{_fmt(c.get('peak_memory_mb'), 0)} | {'' if cos is None else f'{cos:.6f}'} |")
    return lines
