"""Browser benchmark: the vit_t encoder in headless Chromium (the whole model in the page).

    python benchmarks/bench_web_encoder.py --out /tmp/bench_web_encoder          # vit_t at 1024

Builds (or reuses, ``--export``) a vit_t export with random weights (fp32, and int8 with
``--precision fp32,int8`` where its gate passes), makes one synthetic 1024x1024 RGB PNG, builds a site
with the encoder in the browser for each precision and drives it in Debian's chromium
(puppeteer-core, tests/web/drive_encoder.mjs) over ``peft_export.web.serve`` (COOP/COEP: wasm on
min(cores, 8) threads, 2 on a 2-core host). The page opens the PNG ``--images`` times through its
file input, as a person does; each time it preprocesses it (encoder.js), runs the encoder and
prepares the click decoder, then ``--clicks`` prompts (click, click, box, ...; the previous mask
fed back). The first image is warm-up. Reported: median ms per image of preprocessing, encoder and
decoder preparation, their sum, the encoder session's load time, and the median ms per click.
For context the same encoder graph in ONNX Runtime (Python, same thread count) in the same run.

Writes OUT/bench_web_encoder.json and prints a table. Needs: chromium, node, `npm ci`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from peft_export.bench.stats import device_info  # noqa: E402
from peft_export.web import build_site  # noqa: E402

import web_common  # noqa: E402 (same folder)
from web_common import load_average, log  # noqa: E402

warnings.filterwarnings("ignore", message="no checkpoint given")
DRIVER = ROOT / "tests" / "web" / "drive_encoder.mjs"


def make_vit_t_export(out: Path, size: int, precisions: tuple[str, ...]) -> Path:
    return web_common.make_export(out, "vit_t", size, precisions, ", ".join(precisions))


def make_png(out: Path, size: int) -> Path:
    """A synthetic nuclei image as an 8-bit RGB PNG (what a person opens in the page)."""
    from PIL import Image

    from peft_export.data import synthetic_sample
    from peft_export.predict.overlay import display_image

    image, _ = synthetic_sample(size, seed=3)
    path = out / f"nuclei_{size}.png"
    Image.fromarray(display_image(image, None)).convert("RGB").save(path)
    return path


def prompt_steps(width: int, height: int, clicks: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    x, y = int(rng.integers(width // 8, width * 7 // 8)), int(rng.integers(height // 8, height * 7 // 8))
    r = max(width // 20, 4)
    cycle = [{"click": [x, y]}, {"click": [min(x + r // 2, width - 1), y]},
             {"drag": [max(x - r, 0), max(y - r, 0), min(x + r, width - 1), min(y + r, height - 1)]}]
    return [cycle[i % 3] for i in range(clicks)]


def drive(site: Path, steps: list, work: Path, tag: str, chromium: str) -> dict:
    plan = {"chromium": chromium, "userDataDir": str(work / f"profile-{tag}"), "steps": steps, "timeoutMs": 600_000}
    return web_common.drive(DRIVER, site, True, plan, work, tag, timeout_s=3600)


def native_encoder_ms(export: Path, precision: str, threads: int, png: Path, n: int) -> float:
    """The same encoder graph in ONNX Runtime (Python), median of n after one warm-up."""
    from peft_export.predict import read_image
    from peft_export.runtime import SamSession
    from peft_export.runtime.preprocess import prepare_image

    session = SamSession(export, precision=precision)
    x, _, _ = prepare_image(read_image(png), session.manifest["preprocessing"].get("intensity"), session.image_size)
    import onnxruntime as ort

    from peft_export.runtime import session_options

    entry = session.manifest["graphs"]["encoder"][precision]
    sess = ort.InferenceSession(str(export / entry["path"]), session_options("cpu", threads),
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    times = []
    for _ in range(n + 1):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times[1:]))


def median(values: list[float]) -> float:
    return float(np.median(np.asarray(values, np.float64))) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_web_encoder"))
    parser.add_argument("--export", type=Path, default=None, help="existing vit_t export (default: a random one)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--precision", default="fp32", help="encoders to time: fp32, int8 or fp32,int8")
    parser.add_argument("--images", type=int, default=6, help="times the page opens the image (first: warm-up)")
    parser.add_argument("--clicks", type=int, default=6, help="prompts per opened image")
    parser.add_argument("--native-runs", type=int, default=5, help="ONNX Runtime (Python) runs for comparison (0: none)")
    args = parser.parse_args()
    chromium = os.environ.get("PEFTEXPORT_CHROMIUM") or shutil.which("chromium")
    if not chromium or not shutil.which("node") or not (ROOT / "node_modules" / "puppeteer-core").is_dir():
        print("error: needs chromium (apt-get install chromium), node and `npm ci`", file=sys.stderr)
        return 2
    if args.images < 2:
        print("error: --images must be >= 2 (the first is warm-up)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    precisions = tuple(p.strip() for p in args.precision.split(","))
    export = args.export or make_vit_t_export(args.out, args.image_size, tuple(dict.fromkeys(("fp32",) + precisions)))
    manifest = json.loads((export / "manifest.json").read_text())
    size = int(manifest["image_size"])
    png = make_png(args.out, size)
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": device_info()["cpu"], "cores": os.cpu_count(),
              "chromium": version, "export": str(export), "model_type": manifest.get("model_type"),
              "image_size": size, "image": str(png), "load_before": load_average(), "runs": []}
    for precision in precisions:
        if precision not in manifest["graphs"]["encoder"]:
            log(f"{precision}: the export has no {precision} encoder (its gate refused it or it was not exported); skipped")
            continue
        site = args.out / f"site_{precision}"
        summary = build_site(export, [], site, encoder_precision=precision, encoder_in_browser=True, overwrite=True,
                             progress=False)
        steps = []
        for i in range(args.images):
            steps += [{"open": str(png)}] + prompt_steps(size, size, args.clicks, seed=i)
        log(f"{precision} encoder ({summary['bytes_encoder'] / 1e6:.1f} MB): {args.images} images x {args.clicks} "
            f"prompts (load {load_average()})")
        result = drive(site, steps, args.out, f"encoder-{precision}", chromium)
        if result["consoleErrors"] or result["failedRequests"]:
            raise RuntimeError(f"page errors: {result['consoleErrors']} {result['failedRequests']}")
        threads = result["steps"][0]["state"]["threads"]
        encodes = result["encodes"][1:]
        clicks = [t["decoderMs"] for t in result["timings"][args.clicks:]]
        run = {
            "precision": precision, "threads": threads, "encoder_mb": summary["bytes_encoder"] / 1e6,
            "images": len(encodes), "encoder_load_ms": result["encoderLoadMs"],
            "preprocess_median_ms": median([e["preprocessMs"] for e in encodes]),
            "encoder_median_ms": median([e["encoderMs"] for e in encodes]),
            "encoder_min_ms": min(e["encoderMs"] for e in encodes),
            "prepare_median_ms": median([e["prepareMs"] for e in encodes]),
            "per_image_median_ms": median([e["preprocessMs"] + e["encoderMs"] + e["prepareMs"] for e in encodes]),
            "clicks": len(clicks), "click_median_ms": median(clicks),
            "click_p90_ms": float(np.percentile(clicks, 90)) if clicks else float("nan"),
            "wall_s": result["wall_s"], "load": load_average(),
        }
        if args.native_runs:
            run["native_encoder_median_ms"] = native_encoder_ms(export, precision, threads, png, args.native_runs)
        report["runs"].append(run)
        log(f"  encoder median {run['encoder_median_ms']:.0f} ms, per image {run['per_image_median_ms']:.0f} ms, "
            f"click median {run['click_median_ms']:.1f} ms ({threads} thread(s))")
    report["load_after"] = load_average()
    (args.out / "bench_web_encoder.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['date']}  {report['cpu']} ({report['cores']} cores)  {version}  load {report['load_before']}"
          f" -> {report['load_after']}; {report['model_type']} at {size}")
    print("| encoder | wasm threads | encoder ms (median) | preprocess ms | decoder prepare ms | per image ms "
          "| ms per click (median / p90) | ONNX Runtime (Python) encoder ms | encoder load ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["runs"]:
        native = f"{r['native_encoder_median_ms']:.0f}" if "native_encoder_median_ms" in r else "-"
        print(f"| {r['precision']} ({r['encoder_mb']:.1f} MB) | {r['threads']} | {r['encoder_median_ms']:.0f} "
              f"| {r['preprocess_median_ms']:.0f} | {r['prepare_median_ms']:.0f} | **{r['per_image_median_ms']:.0f}** "
              f"| {r['click_median_ms']:.1f} / {r['click_p90_ms']:.1f} | {native} | {r['encoder_load_ms']:.0f} |")
    print(f"medians of {args.images - 1} images (one warm-up) and {max(args.images - 1, 0) * args.clicks} prompts; "
          f"wrote {args.out / 'bench_web_encoder.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
