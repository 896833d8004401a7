"""GPU benchmark of SAM 2.1 (``gpu_bench.py --model sam2.1_hiera_t``): the Hiera encoder base vs merged vs
unmerged LoRA in eager fp32 / bf16 and torch.compile, batch 1 and 8, SAM 2's decoder on fixed features, and the
exported encoder graph on ONNX Runtime's CUDA provider (TF32 off) when this onnxruntime has it.

    python benchmarks/gpu_bench.py --model sam2.1_hiera_t --out OUTDIR            # on CUDA (gpu_check.sh)
    python benchmarks/gpu_bench.py --model sam2.1_hiera_t --out OUTDIR --dry-run  # the plan, any machine
    python benchmarks/gpu_bench.py --model sam2.1_hiera_t --out OUTDIR --device cpu --image-size 64   # smoke run

The encoder is ``SAM2Base.forward_image`` with the decoder's ``conv_s0`` / ``conv_s1``
(``models.sam2.backbone_features``): the image embedding and the two high-resolution maps, what the export's
encoder graph computes. Random weights (no download) with random non-zero adapters; every timed path is first
checked against eager torch (merged vs unmerged, compiled vs eager, the ONNX graph vs eager fp32) on all
three outputs, with ``gpu_bench.GATES``. fp32 means fp32 (TF32 off); bf16 means the whole model in bf16
(``models.sam2.decode`` runs sam2's prompt encoder under autocast). The export case feeds host arrays
(``Sam2Session``'s way: copies to and from the GPU included). SAM 2 has no SDPA-folded attention variant
(``--attention`` is SAM's) and no training run here. Writes OUTDIR/gpu_bench.json and .md.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

from gpu_bench_common import MODELS, _fmt, _parity, log, time_calls, timing_device, build_logged, case_table

SIZE_MULTIPLE = 32
TARGETS = {"merged_over_base_max": 1.01, "unmerged_over_merged_min": 1.03}


def plan(args) -> list[dict]:
    """Every case in the order it runs: eager encoders and the decoder, the export, then the compiles."""
    cases = []
    for b in args.batch_sizes:
        for p in args.precisions:
            for model in ("base", "lora_qv_merged", "lora_qv_unmerged", "late_lora_merged", "late_lora_unmerged"):
                cases.append(dict(part="encoder", model=model, precision=p, compile=False, batch=b))
            cases.append(dict(part="decoder", model="base", precision=p, compile=False, batch=b))
    # the encoder graph's input is one image (1, 3, S, S), as the runtime feeds it
    cases.append(dict(part="export", model="late_lora_merged", precision="fp32", compile=False, batch=1))
    if not args.no_compile:
        for p in reversed(args.precisions):
            for b in args.batch_sizes:
                cases.append(dict(part="encoder", model="base", precision=p, compile=True, batch=b))
    for c in cases:
        where = f"onnxruntime-{'cuda' if args.device == 'cuda' else 'cpu'} " if c["part"] == "export" else ""
        c["name"] = f"{c['part']} {where}{c['model']} {c['precision']}{' compile' if c['compile'] else ''} b{c['batch']}"
    return cases


def check_args(args) -> str | None:
    """Why the arguments cannot run SAM 2 (None: they can)."""
    from peft_export.models.sam2 import SAM2_MODEL_TYPES

    if args.model not in SAM2_MODEL_TYPES:
        return f"--model {args.model}: unknown (use {', '.join(SAM2_MODEL_TYPES)})"
    if args.image_size % SIZE_MULTIPLE:
        return f"--image-size {args.image_size}: SAM 2 needs a multiple of {SIZE_MULTIPLE}"
    return None


def build_models(args) -> dict:
    """{'base', 'lora_qv_unmerged', 'lora_qv_merged', ...}: CPU fp32 SAM 2 models with random non-zero adapters."""
    import torch

    from peft_export.models.sam2 import random_sam2
    from peft_export.peft import PeftConfig, apply_peft, merge_peft

    base = random_sam2(args.model, args.image_size, seed=args.seed).eval()
    models = {"base": base}
    for name, cfg in MODELS.items():
        if cfg is None:
            continue
        adapted = apply_peft(copy.deepcopy(base), PeftConfig(**cfg))
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for n, p in adapted.named_parameters():
                if p.requires_grad and n.startswith("image_encoder."):
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        models[f"{name}_unmerged"] = adapted.eval()
        models[f"{name}_merged"] = merge_peft(adapted).eval()
    return models


def _dtype(precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def _input(args, batch: int, device, dtype):
    import torch

    g = torch.Generator().manual_seed(args.seed + 7)
    return torch.randn(batch, 3, args.image_size, args.image_size, generator=g).to(device=device, dtype=dtype)


def _flat(outputs) -> "torch.Tensor":
    """The encoder's three outputs (embedding, high-res maps) as one float32 CPU vector, for the parity check."""
    import torch

    low, high = outputs
    return torch.cat([t.float().flatten().cpu() for t in (low, *high)])


def _encoder(model, precision: str, compiled: bool, device):
    """A copy of the model on ``device`` in the case's precision, and x -> (embedding, [high-res maps])."""
    from peft_export.models.sam2 import backbone_features, compile_image_encoder

    m = copy.deepcopy(model).to(device=device, dtype=_dtype(precision)).eval()
    if compiled:
        compile_image_encoder(m, dynamic=False)
    return m, (lambda x: backbone_features(m, x))


def reference_output(key: tuple, models: dict, refs: dict, args, device):
    """Eager encoder outputs of (model, precision, batch), computed once."""
    import torch

    if key not in refs:
        name, precision, batch = key
        _, fn = _encoder(models[name], precision, False, device)
        with torch.inference_mode():
            refs[key] = _flat(fn(_input(args, batch, device, _dtype(precision))))
    return refs[key]


def _checked(result: dict, out, key: tuple, models: dict, refs: dict, args, device, vs: str) -> dict:
    parity = _parity(out, reference_output(key, models, refs, args, device), result["precision"])
    result.update(parity_vs=vs, parity=parity)
    if not parity["passed"]:
        result.update(status="failed", reason=f"output differs from the reference (cosine {parity['cosine']:.6f}, "
                                               f"max rel {parity['max_rel']:.2e}); not timed")
    return result


def run_encoder_case(case: dict, models: dict, refs: dict, args, device) -> dict:
    """Check against eager torch (the unmerged model for a merged one, the model itself when compiled), then time."""
    import torch

    model, fn = _encoder(models[case["model"]], case["precision"], case["compile"], device)
    x = _input(args, case["batch"], device, _dtype(case["precision"]))
    with torch.inference_mode():
        out = _flat(fn(x))
    ref_model = case["model"].replace("_merged", "_unmerged")
    key = (ref_model, case["precision"], case["batch"])
    result = {**case, "status": "ok"}
    if ref_model == case["model"] and not case["compile"]:
        refs.setdefault(key, out)  # this case is a reference itself
    else:
        _checked(result, out, key, models, refs, args, device, f"encoder {ref_model} {case['precision']} eager")
    if result["status"] == "ok":
        result["timing"], result["peak_memory_mb"] = time_calls(lambda: fn(x), args, device)
    del model, fn, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_decoder_case(case: dict, models: dict, args, device) -> dict:
    """B box prompts on one image's features (the decoder is not adapted: the same for every model)."""
    import torch

    from peft_export.models.sam2 import Sam2Features, decode

    dtype = _dtype(case["precision"])
    model = copy.deepcopy(models["base"]).to(device=device, dtype=dtype).eval()
    g = args.image_size // 16
    gen = torch.Generator().manual_seed(args.seed + 3)
    feats = Sam2Features(torch.randn(1, 256, g, g, generator=gen).to(device, dtype),
                         [torch.randn(1, 32, 4 * g, 4 * g, generator=gen).to(device, dtype),
                          torch.randn(1, 64, 2 * g, 2 * g, generator=gen).to(device, dtype)])
    xy = torch.rand(case["batch"], 2, generator=gen) * 0.7 * args.image_size
    boxes = torch.cat([xy, xy + 0.2 * args.image_size], dim=1).to(device)
    timing, peak = time_calls(lambda: decode(model, feats, None, None, boxes, None, multimask=True), args, device)
    return {**case, "status": "ok", "timing": timing, "peak_memory_mb": peak}


def ort_provider(device) -> tuple[str | None, str | None]:
    """(the ONNX Runtime provider of the export case, or None and why it cannot run)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    want = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if want not in ort.get_available_providers():
        return None, f"this onnxruntime has no {want} (install onnxruntime-gpu)"
    return want, None


def run_export_case(case: dict, models: dict, refs: dict, args, device, workdir: Path) -> dict:
    """The exported encoder graph (``sam2_image_graphs.export_sam2_encoder``, traced on the CPU) on ONNX Runtime,
    host arrays in and out; checked against eager fp32 torch on ``device``, then timed."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from peft_export.export.sam2_image_graphs import ENCODER_OUTPUTS, export_sam2_encoder
    from peft_export.runtime.backends.ort import session_options

    provider, why = ort_provider(device)
    if provider is None:
        return {**case, "status": "skipped", "reason": why}
    path = workdir / "encoder.onnx"
    t0 = time.perf_counter()
    export_sam2_encoder(models[case["model"]], path, 17)
    # fp32 means fp32 here too: ONNX Runtime's CUDA provider would use TF32 by default
    options = {"use_tf32": "0"} if provider == "CUDAExecutionProvider" else {}
    sess = ort.InferenceSession(str(path), session_options(device.type),
                                providers=[(provider, options), "CPUExecutionProvider"])
    if sess.get_providers()[0] != provider:
        return {**case, "status": "failed", "reason": f"onnxruntime could not start {provider}"}
    x = _input(args, 1, torch.device("cpu"), torch.float32).numpy()
    outs = sess.run(list(ENCODER_OUTPUTS), {"image": x})
    got = torch.cat([torch.from_numpy(np.asarray(o, np.float32)).flatten() for o in outs])
    result = {**case, "status": "ok", "export_seconds": round(time.perf_counter() - t0, 1), "provider": provider,
              "note": "host arrays in and out (copies included), as Sam2Session runs it"}
    _checked(result, got, (case["model"].replace("_merged", "_unmerged"), "fp32", 1), models, refs, args, device,
             "encoder late_lora_unmerged fp32 eager")
    if result["status"] == "ok":
        result["timing"], _ = time_calls(lambda: sess.run(None, {"image": x}), args, torch.device("cpu"))
    return result


def summarize(cases: list[dict], args) -> dict:
    def median(name: str) -> float | None:
        return next((c["timing"]["median_ms"] for c in cases if c["name"] == name and c["status"] == "ok"), None)

    out: dict = {"targets": TARGETS}
    for b in args.batch_sizes:
        for p in args.precisions:
            base = median(f"encoder base {p} b{b}")
            for lora in ("lora_qv", "late_lora"):
                merged, unmerged = median(f"encoder {lora}_merged {p} b{b}"), median(f"encoder {lora}_unmerged {p} b{b}")
                if base and merged:
                    out[f"{lora} merged/base {p} b{b}"] = round(merged / base, 4)
                if merged and unmerged:
                    out[f"{lora} unmerged/merged {p} b{b}"] = round(unmerged / merged, 4)
    eager = median("encoder late_lora_merged fp32 b1")
    export = next((c for c in cases if c["part"] == "export" and c["status"] == "ok"), None)
    if eager and export:
        out["export / eager fp32 b1 (late_lora merged)"] = round(export["timing"]["median_ms"] / eager, 4)
    best = [c for c in cases if c["status"] == "ok" and c["part"] == "encoder" and c["batch"] == 1
            and not c["model"].endswith("_unmerged")]
    if best:
        top = min(best, key=lambda c: c["timing"]["median_ms"])
        out["best_encoder_bs1"] = {"case": top["name"], "median_ms": round(top["timing"]["median_ms"], 3)}
    return out


def format_markdown(result: dict) -> str:
    lines = case_table(result)
    lines += ["", "Summary (encoder median ratios; targets " + json.dumps(TARGETS) + "):", ""]
    lines += [f"- {k}: {v}" for k, v in result["summary"].items() if k != "targets"]
    return "\n".join(lines) + "\n"


def main_sam2(args) -> int:
    """``gpu_bench.main`` for a SAM 2 model (arguments parsed there)."""
    import torch

    from peft_export.bench.stats import device_info, library_versions

    try:
        import sam2  # noqa: F401
    except ImportError:
        print("gpu_bench: the sam2 package is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation "
              "sam2==1.1.0)", file=sys.stderr)
        return 4
    why = check_args(args)
    if why:
        print(f"gpu_bench: {why}", file=sys.stderr)
        return 2
    cases = plan(args)
    if args.dry_run:
        import peft_export.export.sam2_image_graphs  # noqa: F401 - everything the run imports, imported now
        import peft_export.models.sam2  # noqa: F401

        device = torch.device(args.device)
        print(f"dry run: {len(cases)} cases on {args.device} ({args.model}, {args.image_size} px); no training run "
              f"for SAM 2; CUDA visible: {torch.cuda.is_available()}; export case: "
              f"{ort_provider(device)[1] or 'runs'}")
        for c in cases:
            print("  " + c["name"])
        return 0
    device, bf16_ok = timing_device(args)
    if device is None:
        return 3
    t_start = time.perf_counter()
    models = build_logged(args, build_models, t_start)
    results, refs = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu_bench_sam2.") as tmp:
        for case in cases:
            if case["precision"] == "bf16" and not bf16_ok:
                results.append({**case, "status": "skipped", "reason": "no native bf16 on this GPU"})
            elif case["compile"] and device.type != "cuda":
                results.append({**case, "status": "skipped", "reason": "torch.compile is timed on CUDA only"})
            elif time.perf_counter() - t_start > args.budget_s:
                results.append({**case, "status": "skipped", "reason": f"time budget of {args.budget_s:.0f} s used"})
            else:
                try:
                    if case["part"] == "encoder":
                        r = run_encoder_case(case, models, refs, args, device)
                    elif case["part"] == "decoder":
                        r = run_decoder_case(case, models, args, device)
                    else:
                        r = run_export_case(case, models, refs, args, device, Path(tmp))
                except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others
                    r = {**case, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                results.append(r)
            r = results[-1]
            log(f"{r['name']}: {r['status']}" + (f" p50 {r['timing']['median_ms']:.2f} ms" if r.get("timing") else "")
                + (f" ({r['reason']})" if r.get("reason") else ""))
    info = device_info()
    gpu = info.get("gpu") or {}
    result = {
        "format": "peftexport-gpu-bench", "format_version": 1, "family": "sam2",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{gpu.get('name', 'CPU ' + str(info.get('cpu')))} ({args.device})",
        "machine": info, "versions": library_versions(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tf32": False, "cases": results, "training": [], "summary": summarize(results, args),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=2))
    (args.out / "gpu_bench.md").write_text(format_markdown(result))
    print(format_markdown(result))
    log(f"done in {result['seconds']} s; wrote {args.out}/gpu_bench.json and .md")
    return 1 if any(c.get("status") == "failed" for c in results) else 0
