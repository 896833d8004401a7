"""CPU benchmark in one command: torch eager vs our exports on ONNX Runtime and OpenVINO (fp32, int8),
1024 and 512 px, optionally samexporter's export of the same weights; every case in a fresh process.

    python benchmarks/bench_cpu.py --out /tmp/bench_cpu                 # vit_b, 1024 + 512, ~15 min on 2 cores
    python benchmarks/bench_cpu.py --out /tmp/bench_cpu --peers         # + samexporter fp32/int8 (~5 min more)
    python benchmarks/bench_cpu.py --model tiny --sizes 256 --methods lora-qv --out /tmp/b   # a quick look

Random weights (no download): latency does not depend on the values; adapters get small random
values so a merged model really differs from its base. Each case runs in its own process
(``peft_export.bench.measure_fresh``): loading included in its peak RSS, the machine's load and
CPU steal recorded around it, and a busy machine flagged in the table. Prints, measured in this run:

- merged / base and unmerged / base encoder latency per PEFT method (the price of not merging);
- the fastest torch eager fp32 of the run / best export per precision (targets: fp32 >= 2.5x at <= 2.0 GB
  process peak, int8 >= 5x at <= 1.2 GB), with the int8 masks' agreement with fp32 (the export's own gate).
  torch is timed at its best too: the base model once more in a process started with glibc keeping freed
  memory (``GLIBC_TUNABLES``, ``host_memory.GLIBC_TUNABLES_KEEP``), and every speed-up is against the
  fastest torch case at the main size (named in the summary);
- 1024 / 512 latency of the best backend (target >= 4x);
- ours / samexporter per precision with ``--peers`` (target <= 0.8);
- the vit_b fp32 export time with verification (target < 2 min).

Writes OUT/bench_cpu.json (the ``peftexport bench`` format: ``peftexport bench-compare`` reads it)
and OUT/bench_cpu.md; keeps the exports and the merged checkpoints in OUT.
"""

from __future__ import annotations

import argparse
import json
import importlib.util
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from peft_export import bench  # noqa: E402
from peft_export.bench.stats import device_info, library_versions  # noqa: E402
from merged_models import METHODS, build, build_merged_checkpoint, export_model, randomize_adapter  # noqa: E402,F401 (same folder)

warnings.filterwarnings("ignore", message="no checkpoint given")

TARGETS = {"fp32_speedup": 2.5, "fp32_peak_mb": 2000.0, "int8_speedup": 5.0, "int8_peak_mb": 1200.0,
           "vs_peer": 0.8, "size_speedup": 4.0, "export_s": 120.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _export_cases(export: Path, size: int, backends: list[str], tag: str) -> list[bench.FreshCase]:
    cases = []
    for precision in ("fp32", "int8"):
        for backend in backends:
            label = f"{tag}{backend} {precision} @{size}"
            spec = bench.CaseSpec("export", backend, precision, "cpu", provider="cpu", label=label)
            cases.append(bench.FreshCase(spec, str(export)))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--sizes", default="1024,512", help="image sizes; the first is the main one")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", default="lora-qv,late-lora-qkvmlp", help=f"unmerged PEFT methods to time ({', '.join(METHODS)})")
    ap.add_argument("--attention", default="fused", help="extra encoder attention forms to time at the first size (folded, fused; \"\" for none)")
    ap.add_argument("--peers", action="store_true", help="also time samexporter's export of the same weights")
    ap.add_argument("--out", type=Path, default=Path("bench_cpu_out"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown {m} (use {', '.join(METHODS)})")
    forms = [f for f in args.attention.split(",") if f.strip()]
    backends = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = device_info()
    log(f"{machine['cpu']}, {machine['cpu_count_usable']} cores, {machine['ram_gb']} GB; {args.model} at "
        f"{sizes}; backends {backends}; every case in a fresh process")

    main_size = sizes[0]
    results, export_times, agreement, model_files = [], {}, {}, args.out / "models"
    model_files.mkdir(exist_ok=True)
    for size in sizes:
        ckpt = build_merged_checkpoint(args.out, args.model, size)
        log(f"exporting {args.model} at {size} (fp32 + int8, verified)")
        export, seconds = export_model(ckpt, args.out / f"export_{size}", ["fp32", "int8"])
        manifest = json.loads((export / "manifest.json").read_text())
        enc = manifest["graphs"]["encoder"]
        int8_s = enc["int8"]["parity"]["export_seconds"] + sum(
            p["verify_seconds"] for p in [enc["int8"]["parity"], *enc["int8"].get("parity_by_backend", {}).values()])
        export_times[size] = {"fp32_int8_s": round(seconds, 1), "fp32_only_s": round(seconds - int8_s, 1)}
        agreement[size] = enc["int8"]["parity"].get("prompt_agreement")
        cases = _export_cases(export, size, backends, "export ")
        for form in forms if size == main_size else []:
            log(f"exporting {args.model} at {size} with {form} attention")
            fexport, _ = export_model(ckpt, args.out / f"export_{size}_{form}", ["fp32", "int8"], attention=form)
            cases += _export_cases(fexport, size, backends, f"export [{form} attention] ")
        torch_cases = []
        for method in (methods if size == main_size else methods[:1]):
            adapted = build(method, args.model, size)
            file = model_files / f"{method}_{size}.pt"
            desc = bench.save_model(adapted, file)
            kinds = (["base", "merged", "unmerged"] if method == methods[0] else ["merged", "unmerged"])
            if size != main_size:
                kinds = ["base"]
            for kind in kinds:
                if kind == "merged" and method == "adaptformer":
                    continue
                label = f"{kind} torch fp32" + ("" if kind == "base" else f" [{method}]") + f" @{size}"
                spec = bench.CaseSpec(kind, "torch", "fp32", "cpu", note=method, label=label)
                torch_cases.append(bench.FreshCase(spec, None, str(file), desc))
                if kind == "base" and size == main_size:  # torch at its best: freed memory kept
                    spec = bench.CaseSpec(kind, "torch", "fp32", "cpu", note=method, malloc="keep",
                                          label=f"base torch fp32 (freed memory kept) @{size}")
                    torch_cases.append(bench.FreshCase(spec, None, str(file), desc))
        log(f"timing {len(torch_cases) + len(cases)} cases at {size} px, each in a fresh process")
        results += bench.measure_fresh(torch_cases + cases, ["encoder"], size, (16,), 0, args.warmup,
                                       args.iterations, log=log)

    peer_info = None
    if args.peers:
        from compare_peers import peer_cases

        peers, peer_info = peer_cases(args.out, args.out / f"merged_{args.model}_{main_size}.pth", args.model,
                                      main_size, args.warmup, args.iterations, backends)
        for c in peers:
            c["case"] += f" @{main_size}"
        results += peers

    torch_ok = [c for c in results if c.get("backend") == "torch" and c.get("status") == "ok"
                and c["case"].endswith(f"@{main_size}")]
    reference = (min(torch_ok, key=lambda c: c["components"]["encoder"]["median_ms"])["case"] if torch_ok
                 else f"base torch fp32 @{main_size}")  # every ratio against the fastest torch of this run
    bench.add_ratios(results, reference)
    summary = summarize(results, main_size, sizes, export_times, agreement, peer_info, reference)
    result = {
        "format": bench.BENCH_FORMAT, "format_version": bench.BENCH_FORMAT_VERSION,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine, "versions": library_versions(),
        "settings": {"device": "cpu", "model_type": args.model, "image_size": main_size, "sizes": sizes,
                     "warmup": args.warmup, "iterations": args.iterations, "fresh_process": True,
                     "backends": backends, "attention_forms": forms, "torch_threads": torch.get_num_threads(),
                     "weights": "random (seed 0), adapters random small values",
                     "methods": {m: METHODS[m] for m in methods}},
        "reference": reference, "summary": summary, "peer": peer_info,
        "elapsed_s": round(time.perf_counter() - t_start, 1), "cases": results,
    }
    lines = summary_lines(summary)
    print(bench.format_table(result) + "\n\n" + "\n".join(lines), flush=True)
    md = bench.format_table(result, markdown=True) + "\n" + "\n".join(f"- {ln}" for ln in lines) + "\n"
    bench.write_json(args.out / "bench_cpu.json", result)
    bench.write_text(args.out / "bench_cpu.md", md)
    log(f"done in {time.perf_counter() - t_start:.0f} s; wrote {args.out}/bench_cpu.json and bench_cpu.md")
    return 0


def _median(cases: dict, name: str) -> float | None:
    c = cases.get(name)
    return c["components"]["encoder"]["median_ms"] if c and c.get("status") == "ok" else None


def summarize(results, main_size, sizes, export_times, agreement, peer_info, reference) -> dict:
    by = {c["case"]: c for c in results}
    ref = _median(by, reference)
    base = _median(by, f"base torch fp32 @{main_size}")  # merged / base: the same allocator on both sides
    out: dict = {"targets": TARGETS, "export_seconds": export_times, "int8_agreement": agreement,
                 "torch_reference": {"case": reference, "median_ms": ref and round(ref, 1)}}
    for kind in ("merged", "unmerged"):
        out[f"{kind}_over_base"] = {n.split("[")[1].split("]")[0]: round(_median(by, n) / base, 3)
                                    for n in by if n.startswith(f"{kind} torch") and f"@{main_size}" in n
                                    and base and _median(by, n)}
    for precision in ("fp32", "int8"):
        best = [(c["components"]["encoder"]["median_ms"], c) for c in results
                if c.get("status") == "ok" and c.get("model") == "export" and c["precision"] == precision
                and c["case"].endswith(f"@{main_size}")]
        if not best or not ref:
            continue
        ms, c = min(best, key=lambda t: t[0])
        out[f"best_{precision}"] = {"case": c["case"], "median_ms": round(ms, 1), "speedup_vs_torch": round(ref / ms, 2),
                                    "process_peak_mb": (c.get("process") or {}).get("peak_rss_mb"),
                                    "busy": (c.get("load") or {}).get("busy")}
        peers = [p for p in results if p.get("model") == "peer" and p["precision"] == precision and p.get("status") == "ok"]
        if peers:
            out[f"best_{precision}"]["vs_best_peer"] = round(ms / min(p["components"]["encoder"]["median_ms"] for p in peers), 3)
        for size in sizes[1:]:
            small = [x["components"]["encoder"]["median_ms"] for x in results if x.get("status") == "ok"
                     and x.get("model") == "export" and x["precision"] == precision and x["case"].endswith(f"@{size}")]
            if small:
                out[f"best_{precision}"][f"speedup_{main_size}_over_{size}"] = round(ms / min(small), 2)
    if peer_info:
        out["peer"] = peer_info
    return out


def summary_lines(s: dict) -> list[str]:
    t = s["targets"]
    f = lambda x, nd=2: "-" if x is None else f"{x:.{nd}f}"  # noqa: E731
    lines = ["Summary (encoder medians of this run, each case in a fresh process):",
             f"torch reference: the fastest torch case, {s['torch_reference']['case']} "
             f"({f(s['torch_reference']['median_ms'], 1)} ms)"]
    for kind in ("merged", "unmerged"):
        for m, v in s.get(f"{kind}_over_base", {}).items():
            lines.append(f"{kind}/base [{m}]: {f(v, 3)}" + ("  (target <= 1.02)" if kind == "merged" else ""))
    for precision in ("fp32", "int8"):
        b = s.get(f"best_{precision}")
        if not b:
            continue
        speed_t, peak_t = t[f"{precision}_speedup"], t[f"{precision}_peak_mb"]
        lines.append(f"best {precision}: {b['case']}: {f(b['speedup_vs_torch'])}x the fastest torch (target >= {speed_t}), "
                     f"process peak {f(b['process_peak_mb'], 0)} MB (target <= {peak_t:.0f})"
                     + ("; BUSY machine, provisional" if b.get("busy") else ""))
        for k, v in b.items():
            if k.startswith("speedup_") and k != "speedup_vs_torch":
                lines.append(f"  {k.replace('speedup_', '').replace('_over_', ' px / ')} px latency: {f(v)}x "
                             f"(target >= {t['size_speedup']})")
        if "vs_best_peer" in b:
            lines.append(f"  ours / samexporter: {f(b['vs_best_peer'], 3)} (target <= {t['vs_peer']})")
    for size, a in (s.get("int8_agreement") or {}).items():
        if a:
            lines.append(f"int8 vs fp32 masks @{size} ({a['prompts']} prompts): IoU mean {a['mask_iou_mean']:.4f}, "
                         f"min {a['mask_iou_min']:.4f} (gate 0.99 / 0.97)")
    for size, e in s.get("export_seconds", {}).items():
        lines.append(f"export @{size}: fp32 with verification {f(e['fp32_only_s'], 0)} s (target < {t['export_s']:.0f}), "
                     f"fp32 + int8 {f(e['fp32_int8_s'], 0)} s")
    if (s.get("peer") or {}).get("skipped"):
        lines.append(f"samexporter skipped: {s['peer']['skipped']}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
