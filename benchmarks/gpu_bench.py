"""GPU benchmark: SAM encoder and decoder on CUDA -- base vs merged vs unmerged LoRA, eager fp32 / bf16,
SAM's attention vs the folded SDPA attention, torch.compile, batch 1 and 8 -- and a short bf16 training
run (late LoRA vs full finetuning).

    python benchmarks/gpu_bench.py --out OUTDIR              # vit_b at 1024 on CUDA (benchmarks/gpu_check.sh)
    python benchmarks/gpu_bench.py --out OUTDIR --dry-run    # checks imports and arguments, prints the plan
    python benchmarks/gpu_bench.py --out OUTDIR --device cpu --model tiny --image-size 128   # smoke run
    python benchmarks/gpu_bench.py --out OUTDIR --model sam2.1_hiera_t      # SAM 2.1 (gpu_bench_sam2.py)

Random weights (no download; latency does not depend on them) with random non-zero adapters. Every
timed path is first checked against eager fp32/bf16 SAM (merged vs unmerged, SDPA vs SAM's attention,
compiled vs eager); a path that fails its check is reported as failed and not timed; a training run
that raises is reported as failed under its name. Cases that do not
fit ``--budget-s`` are listed as skipped with that reason. Writes OUTDIR/gpu_bench.json and .md.
fp32 means fp32 (TF32 off); bf16 means bf16 encoder weights and activations, the decoder under bf16
autocast (segment_anything's prompt encoder makes float32 coordinates). Exit code: 0, 1 when a check
or a training run failed, 2 bad arguments, 3 no CUDA device.

Longer than 400 lines because it is one self-contained script carried to GPU machines (plan, cases,
training, report), run there without the rest of the benchmarks folder.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message="no checkpoint given")

from gpu_bench_common import GATES, MODELS, _fmt, _parity, log, time_calls, timing_device, build_logged, case_table  # noqa: E402,F401

PRECISIONS = ("fp32", "bf16")
ATTENTIONS = ("sam", "sdpa")
TARGETS = {"merged_over_base_max": 1.01, "unmerged_over_merged_min": 1.03, "best_encoder_bs1_ms_max": 8.0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="vit_b", help="vit_b, vit_l, vit_h, tiny, or a SAM 2.1 type (sam2.1_hiera_t ...)")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of this script")
    ap.add_argument("--batch-sizes", default="1,8", help="encoder images / decoder prompts per call")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--attention", default="sam,sdpa", help="sam: SAM's attention; sdpa: the folded SDPA path")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="do not time torch.compile")
    ap.add_argument("--train-steps", type=int, default=8, help="steps per training run (0: no training run)")
    ap.add_argument("--budget-s", type=float, default=280.0, help="start no new case after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="check imports and arguments, print the plan, exit")
    args = ap.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch-sizes: not a list of integers: {args.batch_sizes!r}")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.attention = [a.strip() for a in args.attention.split(",") if a.strip()]
    bad = [p for p in args.precisions if p not in PRECISIONS] + [a for a in args.attention if a not in ATTENTIONS]
    if bad or not args.batch_sizes or min(args.batch_sizes) < 1 or not args.precisions or not args.attention:
        ap.error(f"bad --batch-sizes/--precisions/--attention (unknown: {bad}; precisions {PRECISIONS}, "
                 f"attention {ATTENTIONS})")
    if args.iterations < 1 or args.warmup < 0 or args.image_size % 16:
        ap.error("--iterations >= 1, --warmup >= 0 and --image-size a multiple of 16, please")
    return args


def plan(args) -> list[dict]:
    """Every encoder/decoder case in the order it runs (compile last: it is the slowest to set up)."""
    cases = []
    for b in args.batch_sizes:
        for p in args.precisions:
            for model in ("base", "lora_qv_merged", "lora_qv_unmerged", "late_lora_merged", "late_lora_unmerged"):
                cases.append(dict(part="encoder", model=model, precision=p, attention="sam", compile=False, batch=b))
            if "sdpa" in args.attention:
                cases.append(dict(part="encoder", model="base", precision=p, attention="sdpa", compile=False, batch=b))
            cases.append(dict(part="decoder", model="base", precision=p, attention="-", compile=False, batch=b))
    if not args.no_compile:
        for attention in reversed(args.attention):  # sdpa first: the candidate for the best path
            for p in reversed(args.precisions):
                for b in args.batch_sizes:
                    cases.append(dict(part="encoder", model="base", precision=p, attention=attention, compile=True,
                                      batch=b))
    for c in cases:
        c["name"] = (f"{c['part']} {c['model']} {c['precision']} {c['attention']}"
                     f"{' compile' if c['compile'] else ''} b{c['batch']}")
    return cases


# ---- models ------------------------------------------------------------------------------------


def build_models(args) -> dict:
    """{'base', 'lora_qv_unmerged', 'lora_qv_merged', ...}: CPU fp32 models with random non-zero adapters."""
    import torch

    from peft_export.models import random_sam
    from peft_export.peft import PeftConfig, apply_peft, merge_peft

    base = random_sam(args.model, args.image_size, seed=args.seed)
    models = {"base": base.eval()}
    for name, cfg in MODELS.items():
        if cfg is None:
            continue
        adapted = apply_peft(copy.deepcopy(base), PeftConfig(**cfg))
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for n, p in adapted.named_parameters():
                if p.requires_grad and "image_encoder" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        models[f"{name}_unmerged"] = adapted.eval()
        models[f"{name}_merged"] = merge_peft(adapted).eval()
    return models


def _encoder_input(args, batch: int, device, dtype):
    import torch

    g = torch.Generator().manual_seed(args.seed + 7)
    return torch.randn(batch, 3, args.image_size, args.image_size, generator=g).to(device=device, dtype=dtype)


def _prepare_encoder(model, precision: str, attention: str, compiled: bool, device):
    """The encoder as the case runs it (a copy on ``device``), and a callable x -> embedding."""
    import torch

    from peft_export.models.folded_attention import FoldedAttention

    encoder = copy.deepcopy(model.image_encoder).to(device)
    if precision == "bf16":
        encoder = encoder.to(torch.bfloat16)
    if attention == "sdpa":
        for blk in encoder.blocks:
            blk.attn = FoldedAttention(blk.attn, pad_to=8)
    fn = torch.compile(encoder, dynamic=False) if compiled else encoder
    return encoder, fn


# ---- timing ------------------------------------------------------------------------------------


def reference_output(key: tuple, models: dict, refs: dict, args, device):
    """Eager encoder output with SAM's own attention of (model, precision, batch), computed once."""
    import torch

    if key not in refs:
        model, precision, batch = key
        _, fn = _prepare_encoder(models[model], precision, "sam", False, device)
        x = _encoder_input(args, batch, device, torch.bfloat16 if precision == "bf16" else torch.float32)
        with torch.inference_mode():
            refs[key] = fn(x).float().cpu()
    return refs[key]


def run_encoder_case(case: dict, models: dict, refs: dict, args, device) -> dict:
    """Check the case's output against its reference, then time it.

    The reference is eager SAM attention at the same precision and batch: of the unmerged model
    for a merged one, of the model itself for the SDPA and compiled paths."""
    import torch

    encoder, fn = _prepare_encoder(models[case["model"]], case["precision"], case["attention"], case["compile"], device)
    dtype = torch.bfloat16 if case["precision"] == "bf16" else torch.float32
    x = _encoder_input(args, case["batch"], device, dtype)
    with torch.inference_mode():
        out = fn(x).float().cpu()
    ref_model = case["model"].replace("_merged", "_unmerged")
    key = (ref_model, case["precision"], case["batch"])
    result = {**case, "status": "ok"}
    if ref_model == case["model"] and case["attention"] == "sam" and not case["compile"]:
        refs.setdefault(key, out)  # this case is a reference itself
    else:
        parity = _parity(out, reference_output(key, models, refs, args, device), case["precision"])
        result["parity_vs"] = f"encoder {ref_model} {case['precision']} sam eager"
        result["parity"] = parity
        if not parity["passed"]:
            result["status"] = "failed"
            result["reason"] = (f"output differs from the reference (cosine {parity['cosine']:.6f}, "
                                f"max rel {parity['max_rel']:.2e}); not timed")
    if result["status"] == "ok":
        t0 = time.perf_counter()
        result["timing"], result["peak_memory_mb"] = time_calls(lambda: fn(x), args, device)
        result["timed_seconds"] = round(time.perf_counter() - t0, 2)
    del encoder, fn, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_decoder_case(case: dict, models: dict, args, device) -> dict:
    """B box prompts on one image embedding (the decoder is not adapted: the same for every model)."""
    import torch

    model = copy.deepcopy(models["base"]).to(device).eval()
    g = args.image_size // 16
    gen = torch.Generator().manual_seed(args.seed + 3)
    emb = torch.randn(1, 256, g, g, generator=gen).to(device)
    xy = torch.rand(case["batch"], 2, generator=gen) * 0.7 * args.image_size
    boxes = torch.cat([xy, xy + 0.2 * args.image_size], dim=1).to(device)
    half = case["precision"] == "bf16"

    def call():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
            return model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=True)

    timing, peak = time_calls(call, args, device)
    return {**case, "status": "ok", "timing": timing, "peak_memory_mb": peak}


# ---- training ----------------------------------------------------------------------------------


def run_training(args, device, workdir: Path) -> list[dict]:
    """A short bf16 finetuning run per method; steps/s from the median step time after the first two."""
    import numpy as np
    import torch

    from peft_export.data import make_demo_data
    from peft_export.training import TrainConfig, finetune

    data = workdir / "data"
    make_demo_data(data, n_images=2, size=args.image_size, seed=args.seed)
    rows = []
    for name, peft, blocks in (("late LoRA (q,k,v,mlp r32, late blocks)", "lora", "late"),
                               ("full finetuning", "full", "all")):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        out = workdir / f"run_{peft}"
        cfg = TrainConfig(out=str(out), data=str(data), model_type=args.model, image_size=args.image_size,
                          patch_size=args.image_size, peft=peft, blocks=blocks, rank=32 if peft == "lora" else None,
                          targets=("q", "k", "v", "mlp"), iterations=args.train_steps, val_fraction=0.0,
                          validate_at_start=False, objects_per_image=5, sub_iterations=1, batch_size=1,
                          precision="bf16", device=device.type, progress=False, seed=args.seed, lr=1e-5,
                          min_object_size=10)
        t0 = time.perf_counter()
        try:
            summary = finetune(cfg)
        except Exception as exc:  # noqa: BLE001 - one failed run is reported by name; the other still runs
            rows.append(failed_run(name, exc))
            log(f"training {name}: FAILED {rows[-1]['reason']}")
            continue
        steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        seconds = [s["seconds"] for s in steps if s.get("type") == "step"]
        timed = seconds[2:] or seconds
        median = float(np.median(timed))
        rows.append({"run": name, "status": "ok", "peft": peft, "blocks": blocks, "precision": "bf16", "steps": len(seconds),
                     "steps_per_s": round(1.0 / median, 3) if median > 0 else None,
                     "median_step_ms": round(1000 * median, 1), "peak_memory_mb": summary["peak_memory_mb"],
                     "trainable_parameters": summary["trainable_parameters"]["total"],
                     "wall_seconds": round(time.perf_counter() - t0, 1), "device": summary["device"]})
        log(f"training {name}: {rows[-1]['steps_per_s']} steps/s, peak {rows[-1]['peak_memory_mb']} MB")
    return rows


def failed_run(name: str, exc: BaseException) -> dict:
    return {"run": name, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}


# ---- report ------------------------------------------------------------------------------------


def exit_status(cases: list[dict], training: list[dict]) -> int:
    """1 when a timed path failed its check or a training run failed (a budget skip is not a failure)."""
    return 1 if any(c.get("status") == "failed" for c in [*cases, *training]) else 0


def _median(cases: list[dict], name: str) -> float | None:
    for c in cases:
        if c["name"] == name and c["status"] == "ok":
            return c["timing"]["median_ms"]
    return None


def summarize(cases: list[dict], args) -> dict:
    out: dict = {"targets": TARGETS}
    for b in args.batch_sizes:
        for p in args.precisions:
            base = _median(cases, f"encoder base {p} sam b{b}")
            for lora in ("lora_qv", "late_lora"):
                merged = _median(cases, f"encoder {lora}_merged {p} sam b{b}")
                unmerged = _median(cases, f"encoder {lora}_unmerged {p} sam b{b}")
                if base and merged:
                    out[f"{lora} merged/base {p} b{b}"] = round(merged / base, 4)
                if merged and unmerged:
                    out[f"{lora} unmerged/merged {p} b{b}"] = round(unmerged / merged, 4)
    best = [c for c in cases if c["status"] == "ok" and c["part"] == "encoder" and c["batch"] == 1
            and c["model"] in ("base", "lora_qv_merged", "late_lora_merged")]
    if best:
        top = min(best, key=lambda c: c["timing"]["median_ms"])
        out["best_encoder_bs1"] = {"case": top["name"], "median_ms": round(top["timing"]["median_ms"], 3)}
    return out


def format_markdown(result: dict) -> str:
    lines = case_table(result)
    if result["training"]:
        lines += ["", "| training (bf16, batch 1) | steps/s | median step ms | peak MB | trainable |",
                  "|---|---:|---:|---:|---:|"]
        for r in result["training"]:
            if r.get("status") != "ok":
                status = "FAILED" if r.get("status") == "failed" else r.get("status")
                lines.append(f"| {r['run']}: {status} ({r.get('reason', '')}) | - | - | - | - |")
                continue
            lines.append(f"| {r['run']} | {_fmt(r['steps_per_s'], 3)} | {_fmt(r['median_step_ms'])} | "
                         f"{_fmt(r['peak_memory_mb'], 0)} | {r['trainable_parameters']:,} |")
    lines += ["", "Summary (encoder median ratios; targets " + json.dumps(TARGETS) + "):", ""]
    lines += [f"- {k}: {v}" for k, v in result["summary"].items() if k != "targets"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from peft_export._compat import torch_version_problem
    from peft_export.bench.stats import device_info, library_versions

    problem = torch_version_problem(torch.__version__)
    if problem:
        print(f"gpu_bench: {problem}", file=sys.stderr)
        return 2
    if args.model.startswith("sam2"):  # SAM 2.1: its own cases (gpu_bench_sam2.py, beside this script)
        from gpu_bench_sam2 import main_sam2

        return main_sam2(args)
    cases = plan(args)
    if args.dry_run:
        import peft_export.data  # noqa: F401 - everything the run imports, imported now
        import peft_export.training  # noqa: F401
        from peft_export.models import ARCHITECTURES
        from peft_export.models.folded_attention import FoldedAttention  # noqa: F401

        if args.model not in ARCHITECTURES:
            print(f"gpu_bench: --model {args.model}: unknown (use {', '.join(ARCHITECTURES)})", file=sys.stderr)
            return 2
        print(f"dry run: {len(cases)} cases on {args.device} ({args.model}, {args.image_size} px), "
              f"training {args.train_steps} steps x 2 runs; CUDA visible: {torch.cuda.is_available()}")
        for c in cases:
            print("  " + c["name"])
        return 0
    device, bf16_ok = timing_device(args)
    if device is None:
        return 3
    t_start = time.perf_counter()
    models = build_logged(args, build_models, t_start)
    results, refs, training = [], {}, []
    train_done = args.train_steps <= 0
    for case in cases:
        if case["compile"] and not train_done:  # training before the slow compiles
            training, train_done = _training(args, device, bf16_ok, t_start), True
        if case["precision"] == "bf16" and not bf16_ok:
            results.append({**case, "status": "skipped", "reason": "no native bf16 on this GPU"})
        elif case["compile"] and device.type != "cuda":
            results.append({**case, "status": "skipped", "reason": "torch.compile is timed on CUDA only"})
        elif time.perf_counter() - t_start > args.budget_s:
            results.append({**case, "status": "skipped", "reason": f"time budget of {args.budget_s:.0f} s used"})
        else:
            try:
                r = (run_encoder_case(case, models, refs, args, device) if case["part"] == "encoder"
                     else run_decoder_case(case, models, args, device))
            except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others
                r = {**case, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            results.append(r)
        r = results[-1]
        log(f"{r['name']}: {r['status']}" + (f" p50 {r['timing']['median_ms']:.2f} ms" if r.get("timing") else "")
            + (f" ({r['reason']})" if r.get("reason") else ""))
    if not train_done:
        training = _training(args, device, bf16_ok, t_start)
    info = device_info()
    gpu = info.get("gpu") or {}
    result = {
        "format": "peftexport-gpu-bench", "format_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{gpu.get('name', 'CPU ' + str(info.get('cpu')))} ({args.device})",
        "machine": info, "versions": library_versions(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tf32": False, "cases": results, "training": training,
        "summary": summarize(results, args), "seconds": round(time.perf_counter() - t_start, 1),
    }
    (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=2))
    (args.out / "gpu_bench.md").write_text(format_markdown(result))
    print(format_markdown(result))
    log(f"done in {result['seconds']} s; wrote {args.out}/gpu_bench.json and .md")
    failed = [r["run"] for r in training if r.get("status") == "failed"]
    if failed:
        log(f"training FAILED: {', '.join(failed)}")
    return exit_status(results, training)


def _training(args, device, bf16_ok: bool, t_start: float) -> list[dict]:
    if args.train_steps <= 0:
        return []
    if not bf16_ok:
        return [{"run": "training", "status": "skipped", "reason": "no native bf16 on this GPU"}]
    if time.perf_counter() - t_start > args.budget_s:
        return [{"run": "training", "status": "skipped", "reason": f"time budget of {args.budget_s:.0f} s used"}]
    with tempfile.TemporaryDirectory(prefix="gpu_bench_train.") as tmp:
        try:
            return run_training(args, device, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - report it with the latency results
            log(f"training failed: {type(exc).__name__}: {exc}")  # before any run (e.g. the data)
            return [failed_run("training", exc)]


if __name__ == "__main__":
    sys.exit(main())
