"""SAM 2.1 hiera_t against vit_t and vit_b on the CPU: image encoders, every case in a fresh process, one table.

    python benchmarks/bench_sam2.py --out /tmp/bench_sam2                 # ~15-25 min on 2 cores (1024 px)
    python benchmarks/bench_sam2.py --out /tmp/b --quick                  # smoke test: 256 px, 1 iteration, no vit_b

Cases (random weights with a random LoRA r4 merged in; encoder medians):

- hiera_t in torch eager fp32 (``SAM2Base.forward_image``: Hiera + FPN + conv_s0/s1, what the export computes),
  and in bf16 (CPU autocast) where the CPU has native bfloat16, so that a bf16 export meets torch at its best;
- hiera_t's export (``merge-and-export``: fp32 and int8 through the gate, bf16 where the CPU has native
  bfloat16) on ONNX Runtime and OpenVINO (bf16: OpenVINO only). int8 is static QDQ calibrated on
  ``--calibration-images`` generated demo images and two colour images (``--calibration-images 0``: dynamic); OpenVINO runs it in
  its bf16 mode where the export verified that (native bfloat16 CPUs), as the runtime does;
- vit_t's and vit_b's exports (the same precisions) on the same backends, the reference of SAM 1 sizes.

Each case runs in a child process of its own (``--child``): model load, warm-up, timed runs, peak RSS
(VmHWM). The parent prints the CPU model and the load average before and after, and the ratios the issue
asks for: hiera_t best export vs its torch eager (target >= 2.5x), and hiera_t vs vit_t vs vit_b.
Writes OUT/bench_sam2.json and OUT/bench_sam2.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_VS_EAGER = 2.5
warnings.filterwarnings("ignore", message="no checkpoint given")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def adapted_model(model_type: str, size: int):
    import torch

    from peft_export.peft import PeftConfig, build_adapted_model

    adapted = build_adapted_model(PeftConfig("lora", blocks="late", rank=4), model_type, None, size, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if "w_b_linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return adapted


def export(model_type: str, size: int, out: Path, precisions: tuple[str, ...], calibration: Path | None) -> Path:
    from peft_export.export import merge_and_export

    path = out / f"{model_type}_{size}"
    if not (path / "manifest.json").is_file():
        log(f"exporting {model_type} at {size} ({', '.join(precisions)}"
            f"{', int8 calibrated on ' + str(calibration) if calibration and 'int8' in precisions else ''})")
        merge_and_export(adapted_model(model_type, size), path, precisions=precisions, overwrite=True, progress=False,
                         calibration_data=calibration if "int8" in precisions else None)
    return path


def calibration_images(out: Path, n: int, size: int) -> Path | None:
    """Varied images for the static int8 ranges: ``n`` generated demo images (grey nuclei) and two colour
    blob images (``merge.probe_pixels`` of seeds 11 and 12; the gate's probe is seed 0). Ranges fitted to
    the nuclei alone clip the colour probe's activations and the gate refuses the graph (hiera_t 1024:
    prompt IoU mean 0.988). None (``n`` 0): dynamic int8."""
    if n <= 0:
        return None
    import numpy as np
    import tifffile

    from peft_export.data import make_demo_data
    from peft_export.merge import probe_pixels

    folder = out / "calibration"
    if not (folder / "images").is_dir():
        make_demo_data(folder, n_images=n, size=size, seed=5)
        for seed in (11, 12):
            rgb = probe_pixels(size, seed)[0].permute(1, 2, 0).numpy().round().astype(np.uint8)
            tifffile.imwrite(folder / "images" / f"colour_{seed}.tif", rgb)
    return folder / "images"


def child(case: dict) -> dict:
    """One case, in this (fresh) process: median encoder ms, all times, peak RSS."""
    import numpy as np

    from peft_export.bench.stats import peak_rss_mb

    size, warmup, iterations = case["size"], case["warmup"], case["iterations"]
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    if case["kind"] == "eager":
        import torch

        model = adapted_model(case["model_type"], size).model
        from peft_export.peft import merge_peft

        model = merge_peft(model)
        xt = torch.from_numpy(x)
        run = lambda: model.forward_image(xt)  # noqa: E731
        ctx = torch.inference_mode()
        if case.get("precision") == "bf16":
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model.forward_image(xt)
    else:
        import contextlib

        from peft_export.runtime.backends import open_backend
        from peft_export.runtime.manifest import bf16_mode_graphs

        manifest = json.loads((Path(case["export"]) / "manifest.json").read_text())
        entry = manifest["graphs"]["encoder"][case["precision"]]
        # as the runtime: bf16 mode for bf16, and for int8 where the export verified it (native bf16 CPUs)
        backend = open_backend(case["backend"], {"encoder": Path(case["export"]) / entry["path"]}, "cpu", None,
                               *bf16_mode_graphs(manifest["graphs"], {"encoder": case["precision"]}))
        case = {**case, "bf16_mode": "encoder" in getattr(backend, "bf16_graphs", ())}
        run = lambda: backend.run("encoder", {"image": x})  # noqa: E731
        ctx = contextlib.nullcontext()
    times = []
    with ctx:
        for i in range(warmup + iterations):
            t = time.perf_counter()
            run()
            if i >= warmup:
                times.append(1e3 * (time.perf_counter() - t))
    return {**case, "median_ms": float(np.median(times)), "times_ms": times, "peak_rss_mb": peak_rss_mb()}


def fresh(case: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(case)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {**case, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(r: dict) -> str:
    if r["kind"] == "eager":
        return f"{r['model_type']} torch eager {r.get('precision', 'fp32')}"
    mode = " (bf16 mode)" if r.get("bf16_mode") and r["precision"] == "int8" else ""
    return f"{r['model_type']} export {r['backend']} {r['precision']}{mode}"


def best(results: list[dict], model_type: str) -> dict | None:
    done = [r for r in results if r["model_type"] == model_type and r["kind"] == "export" and "median_ms" in r]
    return min(done, key=lambda r: r["median_ms"]) if done else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for the exports and the results (required)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=7)
    ap.add_argument("--backends", default="onnxruntime,openvino")
    ap.add_argument("--no-vit-b", action="store_true", help="leave vit_b out (its export takes minutes)")
    ap.add_argument("--calibration-images", type=int, default=4,
                    help="generated demo images the int8 graphs are calibrated on (static QDQ); 0: dynamic int8")
    ap.add_argument("--export-only", action="store_true",
                    help="make the exports and stop (then time them on a quiet machine)")
    ap.add_argument("--quick", action="store_true", help="256 px, 1 warm-up, 1 iteration, no vit_b, fp32 only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.out is None:
        ap.error("--out is required")
    from peft_export.bench.stats import device_info, library_versions

    if args.quick:
        args.size, args.warmup, args.iterations, args.no_vit_b = 256, 1, 1, True
    from peft_export.runtime.backends.ov import native_bf16

    no_bf16 = native_bf16()
    precisions = (("fp32",) if args.quick else ("fp32", "int8")) + (("bf16",) if no_bf16 is None else ())
    args.out.mkdir(parents=True, exist_ok=True)
    device, load_before = device_info(), os.getloadavg()
    log(f"CPU {device.get('cpu')}, load average {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}")
    models = ["sam2.1_hiera_t", "vit_t"] + ([] if args.no_vit_b else ["vit_b"])
    calibration = calibration_images(args.out, args.calibration_images, args.size) if "int8" in precisions else None
    exports = {m: export(m, args.size, args.out, precisions, calibration) for m in models}
    if args.export_only:
        log(f"exports ready in {args.out}")
        return 0
    common = {"size": args.size, "warmup": args.warmup, "iterations": args.iterations}
    cases = [{"kind": "eager", "model_type": "sam2.1_hiera_t", "precision": p, **common}
             for p in ("fp32", "bf16") if p == "fp32" or no_bf16 is None]
    for m in models:
        available = json.loads((exports[m] / "manifest.json").read_text())["graphs"]["encoder"]
        cases += [{"kind": "export", "model_type": m, "export": str(exports[m]), "backend": b, "precision": p, **common}
                  for p in precisions if p in available for b in args.backends.split(",")
                  if p != "bf16" or b == "openvino"]
    results = []
    for case in cases:
        r = fresh(case)
        results.append(r)
        log(f"{label(r):<45} " + (f"{r['median_ms']:9.1f} ms  peak {r['peak_rss_mb']:7.0f} MB" if "median_ms" in r
                                  else f"failed: {r['error']}"))
    load_after = os.getloadavg()
    eager = next((r for r in results if r["kind"] == "eager" and "median_ms" in r and r["precision"] == "fp32"), None)
    eager_bf16 = next((r for r in results if r["kind"] == "eager" and "median_ms" in r and r["precision"] == "bf16"), None)
    hiera = best(results, "sam2.1_hiera_t")
    lines = [f"# SAM 2 hiera_t encoder vs vit_t and vit_b ({args.size} px, {time.strftime('%Y-%m-%d %H:%M %Z')})", "",
             f"CPU: {device.get('cpu')}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
             f"every case in a fresh process, median of {args.iterations} after {args.warmup} warm-up", "",
             "| case | median ms | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {label(r)} | {r.get('median_ms', float('nan')):.1f} | {r.get('peak_rss_mb', float('nan')):.0f} |"
              for r in results]
    lines.append("")
    if eager and hiera:
        ratio = eager["median_ms"] / hiera["median_ms"]
        lines.append(f"hiera_t best export ({label(hiera)}) vs torch eager: {ratio:.2f}x faster "
                     f"(target {TARGET_VS_EAGER}x: {'met' if ratio >= TARGET_VS_EAGER else 'missed'})")
    if eager_bf16 and hiera:
        lines.append(f"hiera_t best export vs torch eager in bf16 (autocast): "
                     f"{eager_bf16['median_ms'] / hiera['median_ms']:.2f}x faster")
    for m in models[1:]:
        other = best(results, m)
        if hiera and other:
            lines.append(f"hiera_t best export / {m} best export: {hiera['median_ms'] / other['median_ms']:.2f}")
    text = "\n".join(lines)
    print(text)
    (args.out / "bench_sam2.md").write_text(text + "\n")
    (args.out / "bench_sam2.json").write_text(json.dumps(
        {"device": device, "versions": library_versions(), "load_average": [load_before, load_after],
         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
