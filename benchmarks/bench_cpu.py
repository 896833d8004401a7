"""CPU benchmark: merged vs unmerged vs base SAM in torch, and ONNX Runtime fp32 / int8.

    python benchmarks/bench_cpu.py --out /tmp/bench_cpu                  # vit_b at 1024, ~10 min on 2 cores
    python benchmarks/bench_cpu.py --image-size 256 --iterations 2       # quick look

Random weights (no download): latency does not depend on the values. Every case is
loaded first and the timed iterations run the cases in turn (A B C ... A B C), so slow
drift of the machine hits all cases alike. Prints, measured side by side in this run:

- merged / base encoder latency (target <= 1.02: a merged model *is* a plain SAM);
- unmerged / base per PEFT method (the price of not merging);
- torch eager fp32 / ONNX Runtime fp32 (target >= 2.5x);
- ONNX Runtime int8 vs fp32 speed, with the int8 mask IoU and embedding cosine against fp32.

Writes OUT/bench_cpu.json (the ``peftexport bench`` format: ``peftexport bench-compare``
reads it), OUT/bench_cpu.md, OUT/bench_cpu.png and keeps the export in OUT/export.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from peft_export import bench  # noqa: E402
from peft_export.peft.adapters import AdaptedModel, build_adapted_model  # noqa: E402
from peft_export.models import load_sam  # noqa: E402
from peft_export.peft import PeftConfig, merge_peft  # noqa: E402
from peft_export.bench.stats import device_info, library_versions  # noqa: E402

warnings.filterwarnings("ignore", message="no checkpoint given")

# name -> PEFT config; LoRA r32 on q,v in every block (the paper's default LoRA) and the
# paper's recipe, late LoRA r32 on q,k,v,mlp in the last half of the blocks.
METHODS = {
    "lora-qv": dict(method="lora", rank=32, targets=("q", "v"), blocks="all"),
    "late-lora-qkvmlp": dict(method="lora", rank=32, targets=("q", "k", "v", "mlp"), blocks="late"),
    "fact": dict(method="fact", rank=16, blocks="all"),
    "ssf": dict(method="ssf", blocks="all"),
    "adaptformer": dict(method="adaptformer", bottleneck=64, blocks="all"),
}
MERGED = ("lora-qv", "late-lora-qkvmlp")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def randomize_adapter(model: torch.nn.Module, seed: int) -> None:
    """Small random values in every adapter tensor: a zero LoRA B would make merged == base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.image_encoder.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * 0.02
                p.copy_(1.0 + noise if name.endswith((".scale", ".alpha")) else p + noise)


def build(method: str, model_type: str, size: int) -> AdaptedModel:
    t = time.perf_counter()
    adapted = build_adapted_model(PeftConfig(**METHODS[method]), model_type, None, size, seed=0)
    randomize_adapter(adapted.model, seed=1)
    adapted.model.eval()
    log(f"built {method} in {time.perf_counter() - t:.1f} s")
    return adapted


def mask_agreement(export_dir: Path, size: int, threads: int | None) -> dict:
    """int8 vs fp32 through the runtime on a synthetic image: mask IoU per prompt, embedding cosine."""
    from peft_export.data.synthetic import synthetic_sample
    from peft_export.data.prompts import box_from_mask, sample_positive_point
    from peft_export.runtime.session import SamSession

    sample = synthetic_sample(size=min(size, 512), seed=3)
    image, labels = (sample["image"], sample["labels"]) if isinstance(sample, dict) else sample[:2]
    ids = [i for i in np.unique(labels) if i != 0][:8]
    rng = np.random.default_rng(0)
    prompts = []
    for i in ids:
        m = labels == i
        prompts.append(("box", box_from_mask(m)))
        prompts.append(("point", sample_positive_point(m, rng)))
    out: dict = {}
    sessions = {p: SamSession(export_dir, "onnxruntime", "cpu", p, intra_op_threads=threads) for p in ("fp32", "int8")}
    embs, masks = {}, {}
    for p, s in sessions.items():
        s.set_image(image)
        embs[p] = s.get_image_embedding().ravel().astype(np.float64)
        masks[p] = []
        for kind, value in prompts:
            if kind == "box":
                m, _, _ = s.predict(box=np.asarray(value, np.float32), multimask_output=False)
            else:
                m, _, _ = s.predict(point_coords=np.asarray([value], np.float32), point_labels=np.asarray([1]),
                                    multimask_output=False)
            masks[p].append(m[0])
    ious = []
    for a, b in zip(masks["fp32"], masks["int8"]):
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
    a, b = embs["fp32"], embs["int8"]
    out["embedding_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    out["mask_iou_mean"] = float(np.mean(ious)) if ious else None
    out["mask_iou_min"] = float(np.min(ious)) if ious else None
    out["prompts"] = len(ious)
    out["image_shape"] = list(np.asarray(image).shape)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    ap.add_argument("--methods", default=",".join(METHODS), help="unmerged methods to time")
    ap.add_argument("--no-onnx", action="store_true", help="skip the export and the ONNX Runtime cases")
    ap.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    ap.add_argument("--out", type=Path, default=Path("bench_cpu_out"))
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown {m} (use {', '.join(METHODS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = device_info()
    log(f"{machine['cpu']}, {machine['cpu_count_usable']} cores, {machine['ram_gb']} GB; torch threads "
        f"{torch.get_num_threads()}; {args.model} at {args.image_size}px")
    size = args.image_size
    inputs = bench.BenchInputs(size, (16,), seed=0)

    adapted = {m: build(m, args.model, size) for m in methods}
    export_dir = args.out / "export"
    export_s = None
    if not args.no_onnx:
        from peft_export.export import merge_and_export

        source = adapted.get("lora-qv") or build("lora-qv", args.model, size)
        t = time.perf_counter()
        merge_and_export(source, export_dir, precisions=["fp32", "int8"], overwrite=True, exporter=args.exporter)
        export_s = time.perf_counter() - t
        log(f"exported fp32 + int8 in {export_s:.0f} s")

    base, _ = load_sam(args.model, None, size, seed=0, warn_random=False)
    models: dict[str, torch.nn.Module] = {"base": base.eval()}
    for m in MERGED:
        if m in adapted:
            models[f"merged {m}"] = merge_peft(adapted[m].model).eval()
    for m in methods:
        models[f"unmerged {m}"] = adapted[m].model

    runners: list[bench.Runner] = []
    for name, model in models.items():
        kind, _, method = name.partition(" ")
        spec = bench.CaseSpec(kind, "torch", "fp32", "cpu", note=method)
        spec_name = f"{kind} torch fp32" + (f" [{method}]" if method else "")
        runner = bench.TorchRunner(spec, (lambda mdl=model: mdl), inputs)
        runner.spec = _Named(spec, spec_name)
        runners.append(runner)
    if not args.no_onnx:
        for p in ("fp32", "int8"):
            spec = bench.CaseSpec("export", "onnxruntime", p, "cpu", provider="cpu", note="merged lora-qv")
            runners.append(bench.OrtRunner(spec, export_dir, inputs, args.threads, end_to_end=False))

    log(f"timing {len(runners)} cases interleaved: encoder, warm-up {args.warmup}, {args.iterations} iterations")
    cases = bench.measure(runners, ["encoder"], args.warmup, args.iterations, interleave=True, log=log)
    # Decoders are milliseconds: time them on the merged model and the ONNX graphs only.
    dec_names = {"base torch fp32", "export onnxruntime-cpu fp32", "export onnxruntime-cpu int8"}
    dec_runners = [r for r in runners if r.spec.name in dec_names]
    log("timing decoders (base torch, ONNX Runtime)")
    dec = bench.measure(dec_runners, ["decoder_point", "decoder_box", "decoder_boxes_b16"], 1,
                        max(args.iterations, 5), interleave=True, log=log)
    by = {c["case"]: c for c in cases}
    for c in dec:
        by[c["case"]]["components"].update(c["components"])
    reference = "base torch fp32"
    bench.add_ratios(cases, reference)

    agreement = None
    if not args.no_onnx:
        log("int8 vs fp32 masks through the runtime")
        agreement = mask_agreement(export_dir, size, args.threads)

    def r(a: str, b: str) -> float | None:
        return bench.ratio(cases, a, b)

    summary = {
        "merged_over_base": {m: r(f"merged torch fp32 [{m}]", reference) for m in MERGED if m in adapted},
        "unmerged_over_base": {m: r(f"unmerged torch fp32 [{m}]", reference) for m in methods},
        "torch_fp32_over_ort_fp32": r(reference, "export onnxruntime-cpu fp32"),
        "ort_fp32_over_int8": r("export onnxruntime-cpu fp32", "export onnxruntime-cpu int8"),
        "int8_agreement": agreement,
        "export_seconds": export_s,
    }
    result = {
        "format": bench.BENCH_FORMAT, "format_version": bench.BENCH_FORMAT_VERSION,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine, "versions": library_versions(),
        "settings": {"device": "cpu", "model_type": args.model, "image_size": size, "warmup": args.warmup,
                     "iterations": args.iterations, "interleave": True, "torch_threads": torch.get_num_threads(),
                     "ort_threads": args.threads, "weights": "random (seed 0), adapters random small values",
                     "methods": {m: METHODS[m] for m in methods}, "exporter": args.exporter},
        "reference": reference, "summary": summary, "elapsed_s": round(time.perf_counter() - t_start, 1),
        "cases": cases,
    }
    text = bench.format_table(result)
    lines = [text, "", "Summary (encoder medians, same run, interleaved):"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for m, v in summary["merged_over_base"].items():
        lines.append(f"  merged/base [{m}]: {fmt(v)}  (target <= 1.02)")
    for m, v in summary["unmerged_over_base"].items():
        lines.append(f"  unmerged/base [{m}]: {fmt(v)}  (overhead {fmt(None if v is None else (v - 1) * 100)} %)")
    lines.append(f"  torch eager fp32 / ORT fp32: {fmt(summary['torch_fp32_over_ort_fp32'])}x  (target >= 2.5)")
    if agreement:
        lines.append(f"  ORT fp32 / ORT int8: {fmt(summary['ort_fp32_over_int8'])}x faster; int8 vs fp32 mask IoU "
                     f"mean {fmt(agreement['mask_iou_mean'])} (min {fmt(agreement['mask_iou_min'])}, "
                     f"{agreement['prompts']} prompts), embedding cosine {agreement['embedding_cosine']:.5f}")
    report = "\n".join(lines)
    print(report, flush=True)
    md = bench.format_table(result, markdown=True) + "\n" + "\n".join(
        ("- " + ln.strip()) if ln.startswith("  ") else ln for ln in lines[2:]) + "\n"
    bench.write_json(args.out / "bench_cpu.json", result)
    bench.write_text(args.out / "bench_cpu.md", md)
    try:
        bench.write_plot(args.out / "bench_cpu.png", result)
    except Exception as exc:  # the plot is a convenience
        log(f"no plot: {exc}")
    log(f"done in {time.perf_counter() - t_start:.0f} s; wrote {args.out}/bench_cpu.json, .md, .png")
    return 0


class _Named:
    """A CaseSpec with a display name that carries the PEFT method."""

    def __init__(self, spec: bench.CaseSpec, name: str) -> None:
        self._spec, self.name = spec, name

    def __getattr__(self, item):
        return getattr(self._spec, item)


if __name__ == "__main__":
    sys.exit(main())
