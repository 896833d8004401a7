"""GPU benchmark: vit_b on CUDA -- torch eager fp32 / bf16, torch.compile, merged vs unmerged
vs base, and ONNX Runtime's CUDA provider when this onnxruntime has it.

    python benchmarks/gpu_bench.py --out OUTDIR            # called by benchmarks/gpu_check.sh

Random weights (no download; latency does not depend on them). Writes OUTDIR/gpu_bench.json
(``peftexport bench`` format: ``peftexport bench-compare`` reads it), .md and .png.
Backends that are missing (CUDA provider, TensorRT) are listed as skipped with the reason.
Exits 3 without CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

warnings.filterwarnings("ignore", message="no checkpoint given")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", default="16,64")
    ap.add_argument("--no-onnx", action="store_true", help="do not export / time ONNX Runtime")
    ap.add_argument("--no-compile", action="store_true", help="do not time torch.compile")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA device", file=sys.stderr)
        return 3
    from peft_export import bench
    from peft_export.peft.adapters import build_adapted_model
    from peft_export.peft import PeftConfig

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; bf16 is its own case
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    av = bench.detect_availability()
    backends = ["torch"] + ([] if args.no_compile else ["torch-compile"]) + ["tensorrt"]
    extra_skips = []
    if not args.no_onnx:
        if "CUDAExecutionProvider" in av.ort_providers:
            backends.append("onnxruntime")
        else:
            # Skip before exporting: a vit_b export is minutes of work for nothing here.
            why = ("onnxruntime is not installed" if not av.onnxruntime
                   else f"CUDAExecutionProvider is not available in this onnxruntime (has {', '.join(av.ort_providers)}); "
                        "install onnxruntime-gpu instead of onnxruntime")
            extra_skips.append(bench.skip_record(bench.CaseSpec("export", "onnxruntime", "fp32", "cuda", "cuda"), why))

    t0 = time.perf_counter()
    cfg = PeftConfig(method="lora", rank=32, targets=("q", "v"), blocks="all")
    adapted = build_adapted_model(cfg, args.model, None, args.image_size, seed=0)
    with torch.no_grad():  # non-zero LoRA B, so merged really differs from base
        g = torch.Generator().manual_seed(1)
        for name, p in adapted.model.image_encoder.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    adapted.model.eval()
    log(f"built {args.model} + LoRA r32 q,v in {time.perf_counter() - t0:.1f} s; backends {','.join(backends)}")
    result = bench.run_and_write(
        json_out=args.out / "gpu_bench.json", markdown_out=args.out / "gpu_bench.md",
        plot_out=args.out / "gpu_bench.png", overwrite=True,
        adapted=adapted, backends=backends, device="cuda", precisions=["fp32", "bf16"],
        batch_sizes=[int(b) for b in args.batch_size.split(",")], warmup=args.warmup, iterations=args.iterations,
        log=log,
    )
    if extra_skips:
        result["cases"].extend(extra_skips)
    cases = result["cases"]
    ref = result["reference"]
    summary = {
        "merged_over_base_fp32": bench.ratio(cases, "merged torch fp32", ref),
        "unmerged_over_base_fp32": bench.ratio(cases, "unmerged torch fp32", ref),
        "merged_bf16_over_fp32": bench.ratio(cases, "merged torch bf16", "merged torch fp32"),
        "compile_over_eager_fp32": bench.ratio(cases, "merged torch-compile fp32", "merged torch fp32"),
        "compile_over_eager_bf16": bench.ratio(cases, "merged torch-compile bf16", "merged torch bf16"),
        "ort_cuda_fp32_over_torch_fp32": bench.ratio(cases, "export onnxruntime-cuda fp32", "merged torch fp32"),
    }
    result["summary"] = summary
    bench.write_json(args.out / "gpu_bench.json", result)
    md = bench.format_table(result, markdown=True) + "\nSummary (encoder median ratios):\n\n" + "\n".join(
        f"- {k}: {'-' if v is None else f'{v:.3f}'}" for k, v in summary.items()) + "\n"
    bench.write_text(args.out / "gpu_bench.md", md)
    print(bench.format_table(result))
    for k, v in summary.items():
        print(f"  {k}: {'-' if v is None else f'{v:.3f}'}")
    log(f"done in {time.perf_counter() - t0:.0f} s; wrote {args.out}/gpu_bench.json, .md, .png")
    return 1 if any(c["status"] == "failed" for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
