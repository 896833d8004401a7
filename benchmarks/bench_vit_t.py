"""vit_t (MobileSAM) against vit_b on the CPU: every case in a fresh process, one table and the targets.

    python benchmarks/bench_vit_t.py --out /tmp/bench_vit_t                  # ~10-20 min on 2 cores
    python benchmarks/bench_vit_t.py --out /tmp/b --sizes 256,128 --no-vit-b --iterations 1   # a quick look

Cases (encoder medians; random weights, a LoRA r32 q,v merged in, as ``bench_cpu.py``):

- vit_t torch eager fp32 at the main size, also with glibc keeping freed memory (our TinyViT module, as
  ``bench`` times models; every speed-up is against the fastest torch of the run; and, when the
  ``mobile_sam`` package is installed, MobileSAM's own encoder on the same weights, the issue's starting
  point; once more with glibc keeping freed memory, ``host_memory.GLIBC_TUNABLES_KEEP``, which takes eager torch's
  page-fault work away), and its exports (fp32, int8) on ONNX Runtime and OpenVINO at
  every size; an int8 graph the export gate refuses is left out and the refusal is printed;
- vit_b's exports (fp32, int8) at the main size (``--vit-b-eager`` also times vit_b in torch eager);
- ``--calibration``: int8 also as static QDQ (``merge-and-export --calibration-data``, the default
  static recipe and its search) calibrated on 4 synthetic demo images, for both models at the main
  size (``static`` in the case name); the int8 ratio then compares the best int8 of each model;
- AIS: a vit_t export at the AIS size (default 512) with micro-sam's instance decoder, timed
  encoder + ``ais`` (instance decoder + post-processing) in one fresh process.

Targets (issue 22): best vit_t export >= 12x faster than vit_b's best of the same precision and
>= 3x faster than vit_t eager, fp32 process peak <= 600 MB; 1024 >= 3x slower than 512; AIS at 512
(encoder + decoder + post-processing) <= 1 s. Writes OUT/bench_vit_t.json and OUT/bench_vit_t.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_cpu import _export_cases, build, build_merged_checkpoint, log  # noqa: E402
from peft_export import bench  # noqa: E402
from peft_export.bench.stats import device_info, library_versions, peak_rss_mb  # noqa: E402
from peft_export.errors import PeftExportError  # noqa: E402
from peft_export.export import merge_and_export  # noqa: E402
from peft_export.data import make_demo_data  # noqa: E402
from peft_export.models import random_instance_decoder  # noqa: E402
from peft_export.bench.load import load_between  # noqa: E402
from peft_export.bench.load import snapshot as load_snapshot  # noqa: E402
from peft_export.peft.adapters import load_model_source  # noqa: E402
from peft_export.training.host_memory import GLIBC_TUNABLES_KEEP  # noqa: E402

warnings.filterwarnings("ignore", message="no checkpoint given")

TARGETS = {"vs_vit_b": 12.0, "vs_eager": 3.0, "fp32_peak_mb": 600.0, "size_speedup": 3.0, "ais_ms": 1000.0}


def export_precisions(checkpoint: Path, out: Path, size: int, instance_decoder: bool = False,
                      extra: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """Export fp32 + int8 (+ ``extra``, e.g. bf16) at ``size`` (a vit_t checkpoint does not record one: it would
    load at 1024); an int8 refused by the gate is exported again without it. Returns (dir, refusals)."""
    adapted = load_model_source(merged=checkpoint, image_size=size)
    if instance_decoder:
        adapted.instance_decoder = random_instance_decoder(3)
    try:
        merge_and_export(adapted, out, precisions=("fp32", "int8", *extra), overwrite=True, progress=False)
        return out, {}
    except PeftExportError as exc:
        if "int8" not in str(exc):
            raise
        merge_and_export(adapted, out, precisions=("fp32", *extra), overwrite=True, progress=False)
        return out, {"int8": str(exc)}


def export_static_int8(checkpoint: Path, out: Path, size: int, calibration: Path) -> tuple[Path | None, dict]:
    """The int8 encoder as static QDQ calibrated on the images in ``calibration`` (default static recipe and
    its search, as ``merge-and-export --calibration-data``). Returns (dir or None when refused, refusals)."""
    adapted = load_model_source(merged=checkpoint, image_size=size)
    try:
        merge_and_export(adapted, out, precisions=("int8",), calibration_data=calibration, overwrite=True,
                         progress=False)
        return out, {}
    except PeftExportError as exc:
        return None, {"static int8": str(exc)}


def calibration_images(out: Path, size: int) -> Path:
    """4 synthetic demo images (not the gate's probe image) at ``size``, written once."""
    root = out / f"calibration_{size}"
    if not (root / "images").is_dir():
        make_demo_data(root, n_images=4, size=size, seed=11, overwrite=True)
    return root / "images"


def static_cases(model_type: str, checkpoint: Path, out: Path, size: int, backends: list[str],
                 refusals: dict) -> list[bench.FreshCase]:
    log(f"exporting {model_type} static int8 at {size} (calibrated on demo images)")
    export, refused = export_static_int8(checkpoint, out / f"{model_type}_{size}_static", size,
                                         calibration_images(out, size))
    refusals.update({f"{model_type} {p} @{size}": why for p, why in refused.items()})
    if export is None:
        return []
    return [c for c in _export_cases(export, size, backends, f"{model_type} export static ")
            if c.spec.precision == "int8"]


def mobile_sam_eager_child(checkpoint: str, size: int, warmup: int, iterations: int) -> dict:
    """MobileSAM's own image encoder (``mobile_sam`` package) in torch eager on ``checkpoint``: median ms
    and the process's peak RSS. Runs in a fresh process (``--child-mobile-sam``)."""
    import numpy as np
    from mobile_sam import sam_model_registry

    sam = sam_model_registry["vit_t"]()
    sam.load_state_dict(torch.load(checkpoint, weights_only=True))  # strict: MobileSAM's own keys
    sam.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(warmup + iterations):
            t = time.perf_counter()
            sam.image_encoder(x)
            if i >= warmup:
                times.append(1e3 * (time.perf_counter() - t))
    return {"median_ms": float(np.median(times)), "times_ms": times, "threads": torch.get_num_threads(),
            "peak_rss_mb": peak_rss_mb()}  # VmHWM: ru_maxrss would start at this script's peak


def mobile_sam_eager(checkpoint: Path, size: int, warmup: int, iterations: int, malloc: str | None = None
                     ) -> dict | None:
    """``mobile_sam_eager_child`` in a fresh process (``malloc``: its GLIBC_TUNABLES); None when the
    mobile_sam package is not installed."""
    if importlib.util.find_spec("mobile_sam") is None:
        return None
    env = {**os.environ, "GLIBC_TUNABLES": malloc} if malloc else None
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-mobile-sam",
                           json.dumps([str(checkpoint), size, warmup, iterations])], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cases(export: Path, size: int, backends: list[str], tag: str, refused: dict) -> list[bench.FreshCase]:
    return [c for c in _export_cases(export, size, backends, tag) if c.spec.precision not in refused]


def _median(c: dict, component: str = "encoder") -> float | None:
    return c["components"][component]["median_ms"] if c.get("status") == "ok" and component in c["components"] else None


def best(results: list[dict], prefix: str, precision: str, size: int) -> dict | None:
    found = [c for c in results if c["case"].startswith(prefix) and f" {precision} @{size}" in c["case"]
             and _median(c) is not None]
    return min(found, key=_median) if found else None


def summary_lines(results: list[dict], main: int, sizes: list[int], ais_size: int, refusals: dict,
                  mobile_sam: dict | None = None, mobile_sam_kept: dict | None = None) -> list[str]:
    by = {c["case"]: c for c in results}
    ms_eager = (mobile_sam or {}).get("median_ms")
    ms_kept = (mobile_sam_kept or {}).get("median_ms")
    eager = by.get(f"vit_t torch fp32 @{main}")
    # every speed-up against the fastest torch of this run: our module or MobileSAM's, freed memory kept or not
    torch_ms = {name: _median(by[name]) for name in (f"vit_t torch fp32 @{main}", f"vit_t torch fp32 (freed memory "
                                                     f"kept) @{main}") if name in by and _median(by[name])}
    torch_ms.update({k: v for k, v in (("MobileSAM's own encoder", ms_eager),
                                       ("MobileSAM's own encoder (freed memory kept)", ms_kept)) if v})
    fastest = min(torch_ms.items(), key=lambda kv: kv[1]) if torch_ms else None
    lines = ["Summary (encoder medians of this run, each case in a fresh process):"]
    if fastest:
        lines.append(f"fastest torch: {fastest[0]} {fastest[1]:.0f} ms (of {', '.join(f'{k} {v:.0f}' for k, v in torch_ms.items())})")
    for precision in ("fp32", "int8"):
        t = best(results, "vit_t export", precision, main)
        if t is None:
            continue
        ms = _median(t)
        peak = (t.get("process") or {}).get("peak_rss_mb")
        line = f"vit_t best {precision} @{main}: {t['case']} {ms:.0f} ms, process peak {peak} MB"
        b = best(results, "vit_b export", precision, main)
        if b is not None:
            line += f"; vs vit_b best {_median(b):.0f} ms: {_median(b) / ms:.1f}x (target >= {TARGETS['vs_vit_b']:.0f})"
        if fastest:
            line += f"; vs the fastest torch: {fastest[1] / ms:.2f}x (target >= {TARGETS['vs_eager']:.0f})"
        if eager is not None and _median(eager):
            line += f"; vs vit_t eager {_median(eager):.0f} ms: {_median(eager) / ms:.2f}x"
        if ms_eager:
            line += f"; vs MobileSAM's own encoder in eager {ms_eager:.0f} ms: {ms_eager / ms:.2f}x"
        if ms_kept:
            line += f" (with glibc keeping freed memory {ms_kept:.0f} ms: {ms_kept / ms:.2f}x)"
        if precision == "fp32":
            line += f"; peak target <= {TARGETS['fp32_peak_mb']:.0f} MB"
        lines.append(line)
        for size in sizes[1:]:
            s = best(results, "vit_t export", precision, size)
            if s is not None:
                lines.append(f"  vit_t {precision} {main} px / {size} px: {ms / _median(s):.2f}x "
                             f"(target >= {TARGETS['size_speedup']:.0f})")
    ais = by.get(f"vit_t AIS onnxruntime fp32 @{ais_size}")
    if ais is not None and _median(ais) is not None and _median(ais, "ais") is not None:
        total = _median(ais) + _median(ais, "ais")
        lines.append(f"vit_t AIS @{ais_size}: encoder {_median(ais):.0f} ms + decoder and post-processing "
                     f"{_median(ais, 'ais'):.0f} ms = {total:.0f} ms (target <= {TARGETS['ais_ms']:.0f})")
    for what, why in refusals.items():
        lines.append(f"refused: {what}: {why}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,512", help="vit_t image sizes; the first is the main one")
    ap.add_argument("--ais-size", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-vit-b", action="store_true", help="skip vit_b (its export alone takes minutes)")
    ap.add_argument("--vit-b-eager", action="store_true", help="also time vit_b in torch eager (~17 s a call)")
    ap.add_argument("--calibration", action="store_true",
                    help="also time int8 as static QDQ calibrated on demo images (both models, main size; minutes)")
    ap.add_argument("--out", type=Path, default=Path("bench_vit_t_out"))
    ap.add_argument("--child-mobile-sam", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_mobile_sam:
        print(json.dumps(mobile_sam_eager_child(*json.loads(args.child_mobile_sam))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    main_size = sizes[0]
    backends = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    args.out.mkdir(parents=True, exist_ok=True)
    models = args.out / "models"
    models.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    load_before = load_snapshot()  # the machine's load over the whole run, named in the table's header
    machine = device_info()
    log(f"{machine['cpu']}, {machine['cpu_count_usable']} cores; vit_t at {sizes}, AIS at {args.ais_size}; "
        f"backends {backends}; every case in a fresh process")
    results, refusals = [], {}
    mobile_sam = mobile_sam_kept = None

    def run(cases: list[bench.FreshCase], size: int, components=("encoder",)) -> None:
        log(f"timing {len(cases)} case(s) at {size} px")
        results.extend(bench.measure_fresh(cases, list(components), size, (16,), 0, args.warmup, args.iterations,
                                           log=log))

    for size in sizes:
        ckpt = build_merged_checkpoint(args.out, "vit_t", size)
        log(f"exporting vit_t at {size}")
        export, refused = export_precisions(ckpt, args.out / f"vit_t_{size}", size)
        refusals.update({f"vit_t {p} @{size}": why for p, why in refused.items()})
        cases = _cases(export, size, backends, "vit_t export ", refused)
        if size == main_size and args.calibration:
            cases += static_cases("vit_t", ckpt, args.out, size, backends, refusals)
        if size == main_size:
            adapted = build("lora-qv", "vit_t", size)
            desc = bench.save_model(adapted, models / f"vit_t_{size}.pt")
            spec = bench.CaseSpec("base", "torch", "fp32", "cpu", label=f"vit_t torch fp32 @{size}")
            cases.insert(0, bench.FreshCase(spec, None, str(models / f"vit_t_{size}.pt"), desc))
            # torch at its best: the same module in a worker started with glibc keeping freed memory
            spec = bench.CaseSpec("base", "torch", "fp32", "cpu", malloc="keep",
                                  label=f"vit_t torch fp32 (freed memory kept) @{size}")
            cases.insert(1, bench.FreshCase(spec, None, str(models / f"vit_t_{size}.pt"), desc))
        run(cases, size)
        if size == main_size == 1024:  # MobileSAM's own encoder runs at 1024 only (a fixed 64x64 grid)
            log("timing MobileSAM's own encoder in torch eager (fresh process)")
            mobile_sam = mobile_sam_eager(ckpt, size, args.warmup, args.iterations)
            log(f"MobileSAM eager: {mobile_sam}")
            # glibc's malloc set for the whole process as finetune sets it while training: large freed
            # blocks stay mapped and are reused instead of being faulted in again on every call
            mobile_sam_kept = mobile_sam_eager(ckpt, size, args.warmup, args.iterations, GLIBC_TUNABLES_KEEP)
            log(f"MobileSAM eager, glibc keeping freed memory: {mobile_sam_kept}")

    ckpt = build_merged_checkpoint(args.out, "vit_t", args.ais_size)
    log(f"exporting vit_t at {args.ais_size} with an instance decoder")
    try:
        ais_export, _ = export_precisions(ckpt, args.out / f"vit_t_ais_{args.ais_size}", args.ais_size,
                                          instance_decoder=True)
    except PeftExportError as exc:  # recorded, the other cases still run
        refusals[f"vit_t AIS @{args.ais_size}"] = str(exc)
    else:
        spec = bench.CaseSpec("export", "onnxruntime", "fp32", "cpu", provider="cpu",
                              label=f"vit_t AIS onnxruntime fp32 @{args.ais_size}")
        run([bench.FreshCase(spec, str(ais_export))], args.ais_size, ("encoder", "ais"))

    if not args.no_vit_b:
        ckpt = build_merged_checkpoint(args.out, "vit_b", main_size)
        log(f"exporting vit_b at {main_size}")
        export, refused = export_precisions(ckpt, args.out / f"vit_b_{main_size}", main_size)
        refusals.update({f"vit_b {p} @{main_size}": why for p, why in refused.items()})
        cases = _cases(export, main_size, backends, "vit_b export ", refused)
        if args.calibration:
            cases += static_cases("vit_b", ckpt, args.out, main_size, backends, refusals)
        if args.vit_b_eager:
            adapted = build("lora-qv", "vit_b", main_size)
            desc = bench.save_model(adapted, models / f"vit_b_{main_size}.pt")
            spec = bench.CaseSpec("base", "torch", "fp32", "cpu", label=f"vit_b torch fp32 @{main_size}")
            cases.insert(0, bench.FreshCase(spec, None, str(models / f"vit_b_{main_size}.pt"), desc))
        run(cases, main_size)

    lines = summary_lines(results, main_size, sizes, args.ais_size, refusals, mobile_sam, mobile_sam_kept)
    result = {
        "format": bench.BENCH_FORMAT, "format_version": bench.BENCH_FORMAT_VERSION,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine, "versions": library_versions(),
        "settings": {"device": "cpu", "model_type": "vit_t", "image_size": main_size, "sizes": sizes,
                     "ais_size": args.ais_size, "warmup": args.warmup, "iterations": args.iterations,
                     "fresh_process": True, "backends": backends, "torch_threads": torch.get_num_threads(),
                     "weights": "random (seed 0), LoRA q,v r32 merged",
                     "static_int8": "calibrated on 4 demo images (seed 11)" if args.calibration else None},
        "load": load_between(load_before, load_snapshot()),
        "targets": TARGETS, "refusals": refusals, "summary": lines, "mobile_sam_eager": mobile_sam,
        "mobile_sam_eager_keeping_freed_memory": {"GLIBC_TUNABLES": GLIBC_TUNABLES_KEEP, **(mobile_sam_kept or {})},
        "elapsed_s": round(time.perf_counter() - t0, 1), "cases": results,
    }
    print(bench.format_table(result) + "\n\n" + "\n".join(lines), flush=True)
    bench.write_json(args.out / "bench_vit_t.json", result)
    bench.write_text(args.out / "bench_vit_t.md", bench.format_table(result, markdown=True) + "\n"
                     + "\n".join(f"- {ln}" for ln in lines) + "\n")
    log(f"done in {time.perf_counter() - t0:.0f} s; wrote {args.out}/bench_vit_t.json and bench_vit_t.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
