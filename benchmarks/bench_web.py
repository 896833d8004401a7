"""Browser benchmark: decoder latency per click of a `peftexport web` site in headless Chromium.

    python benchmarks/bench_web.py --out /tmp/bench_web      # vit_b at 1024

Builds (or reuses, ``--export``) a vit_b export with random weights, makes one synthetic
1024x1024 nuclei image, builds the site with the fp32 decoder and with the int8 decoder
(latency measured even where the int8 gate refuses it; the gate's IoU is reported), then drives
each site in Debian's chromium (puppeteer-core, tests/web/drive_page.mjs) over a plain server
(one wasm thread: no COOP/COEP) and over ``peft_export.web.serve`` (cross-origin isolated:
threads). Per object: clear, a positive click, a second click, a box drag (3 decodes, the
previous low-res mask fed back). The first object is warm-up. For context the same decoder
graph is timed in ONNX Runtime (Python, 1 thread and default threads) in the same run.

Writes OUT/bench_web.json and prints a table. Needs: chromium, node, `npm ci` (puppeteer-core).
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

from peft_export.web import build_site, site as site_module  # noqa: E402
from peft_export.bench.stats import device_info  # noqa: E402

import web_common  # noqa: E402 (same folder)
from web_common import load_average, log  # noqa: E402

warnings.filterwarnings("ignore", message="no checkpoint given")
DRIVER = ROOT / "tests" / "web" / "drive_page.mjs"


def make_image(out: Path, size: int) -> Path:
    from peft_export.data import make_demo_data

    pairs = make_demo_data(out / "data", n_images=1, size=size, seed=3, overwrite=True)
    return Path(pairs[0].image)


def object_steps(width: int, height: int, n_objects: int) -> list[dict]:
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(n_objects):
        x, y = int(rng.integers(width // 8, width * 7 // 8)), int(rng.integers(height // 8, height * 7 // 8))
        r = max(width // 20, 4)
        steps += [{"clear": True}, {"click": [x, y]}, {"click": [min(x + r // 2, width - 1), y]},
                  {"drag": [max(x - r, 0), max(y - r, 0), min(x + r, width - 1), min(y + r, height - 1)]}]
    return steps


def drive(site: Path, isolate: bool, steps: list, work: Path, tag: str, chromium: str) -> dict:
    plan = {"chromium": chromium, "userDataDir": str(work / f"profile-{tag}"), "screenshot": str(work / f"{tag}.png"),
            "steps": steps, "timeoutMs": 300_000}
    return web_common.drive(DRIVER, site, isolate, plan, work, tag, timeout_s=900)


def summarize(timings: list[dict], skip: int) -> dict:
    ms = np.asarray([t["decoderMs"] for t in timings[skip:]], np.float64)
    post = np.asarray([t["postMs"] for t in timings[skip:]], np.float64)
    return {"n": int(ms.size), "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()), "postprocess_median_ms": float(np.median(post))}


def native_decoder_ms(site: Path, threads: int | None, work: Path, n: int = 20) -> dict:
    """The site's decoder graph in ONNX Runtime (Python): one click on the site's first embedding
    (a click decoder with that image's context.bin beside it, as the page builds it)."""
    import onnxruntime as ort

    from peft_export.runtime import session_options

    meta = json.loads((site / "site.json").read_text())
    rec, decoder = meta["images"][0], meta["decoder"]
    emb = np.fromfile(site / rec["embedding"], "<f4").reshape(meta["embedding_shape"])
    s = meta["low_res_size"]
    graph = site / decoder["path"]
    if decoder.get("context_graph"):
        image = ort.InferenceSession(str(site / decoder["context_graph"]), providers=["CPUExecutionProvider"])
        context = dict(zip([o.name for o in image.get_outputs()], image.run(None, {"image_embeddings": emb})))
        work.mkdir(parents=True, exist_ok=True)
        with open(work / decoder["context_file"], "wb") as f:
            for part in decoder["context"]:
                f.write(np.ascontiguousarray(context[part["name"]], "<f4").tobytes())
        graph = Path(shutil.copyfile(graph, work / decoder["path"]))
    sess = ort.InferenceSession(str(graph), session_options("cpu", threads), providers=["CPUExecutionProvider"])
    feeds = {"image_embeddings": emb, "point_coords": np.array([[[500, 400], [0, 0]]], np.float32),
             "point_labels": np.array([[1, -1]], np.float32), "mask_input": np.zeros((1, 1, s, s), np.float32),
             "has_mask_input": np.zeros(1, np.float32)}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}
    times = []
    for _ in range(n + 3):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1000)
    return {"threads": threads or "default", "median_ms": float(np.median(times[3:]))}


def folder_mb(folder: Path, exclude: str | None = None) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (exclude is None or exclude not in
                                                                                   p.relative_to(folder).parts)) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_web"))
    parser.add_argument("--export", type=Path, default=None, help="existing export dir (default: a random vit_b)")
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--objects", type=int, default=8, help="objects per run (3 decodes each; first is warm-up)")
    parser.add_argument("--precision", default="fp32,int8")
    parser.add_argument("--servers", default="plain,isolated")
    args = parser.parse_args()
    chromium = os.environ.get("PEFTEXPORT_CHROMIUM") or shutil.which("chromium")
    if not chromium or not shutil.which("node") or not (ROOT / "node_modules" / "puppeteer-core").is_dir():
        print("error: needs chromium (apt-get install chromium), node and `npm ci`", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    export = args.export or web_common.make_export(args.out, args.model, args.image_size, ("fp32",),
                                                   "freeze-encoder: no adapter to merge")
    image = make_image(args.out, args.image_size)
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": device_info()["cpu"], "cores": os.cpu_count(),
              "chromium": version, "export": str(export), "image": str(image), "load_before": load_average(),
              "sites": {}, "runs": []}
    for precision in args.precision.split(","):
        site = args.out / f"site_{precision}"
        gate = site_module.INT8_MIN_IOU
        site_module.INT8_MIN_IOU = 0.0  # time int8 even where the gate would refuse it; the IoU is reported
        try:
            summary = build_site(export, [image], site, precision=precision, overwrite=True, progress=False)
        finally:
            site_module.INT8_MIN_IOU = gate
        check = summary["decoder"].get("check")
        report["sites"][precision] = {
            "decoder_mb": summary["bytes_decoder"] / 1e6, "site_without_ort_mb": summary["bytes_site_without_ort"] / 1e6,
            "onnxruntime_web_mb": summary["bytes_onnxruntime_web"] / 1e6, "embeddings_mb": summary["bytes_embeddings"] / 1e6,
            "images_mb": summary["bytes_images"] / 1e6, "int8_check": check,
            "int8_accepted": None if check is None else check["mean_iou"] >= gate,
            "decoder_graph": summary["decoder"]["graph"],
            "native": [native_decoder_ms(site, t, args.out / f"native_{precision}") for t in (1, None)],
        }
        meta = json.loads((site / "site.json").read_text())["images"][0]
        steps = object_steps(meta["width"], meta["height"], args.objects)
        for server in args.servers.split(","):
            log(f"{precision} decoder, {server} server: {len(steps)} steps (load {load_average()})")
            result = drive(site, server == "isolated", steps, args.out, f"{precision}-{server}", chromium)
            state = result["steps"][-1]["state"]
            run = {"precision": precision, "server": server, "threads": state["threads"],
                   "load": load_average(), "wall_s": result["wall_s"], **summarize(result["timings"], skip=3)}
            report["runs"].append(run)
            log(f"  decoder median {run['median_ms']:.1f} ms, p90 {run['p90_ms']:.1f} ms ({run['threads']} thread(s))")
    report["load_after"] = load_average()
    (args.out / "bench_web.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['date']}  {report['cpu']} ({report['cores']} cores)  {version}  load {report['load_before']}"
          f" -> {report['load_after']}")
    print("| decoder | server | wasm threads | median ms per click | p90 ms | decodes | load average |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in report["runs"]:
        server = "python -m http.server" if r["server"] == "plain" else "peft_export.web.serve (COOP/COEP)"
        print(f"| {r['precision']} | {server} | {r['threads']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['n']} "
              f"| {r['load']} |")
    for p, s in report["sites"].items():
        native = ", ".join(f"{n['threads']} thread(s) {n['median_ms']:.1f} ms" for n in s["native"])
        gate = "" if s["int8_check"] is None else (f"; vs fp32 mean IoU {s['int8_check']['mean_iou']:.4f} "
                                                   f"(min {s['int8_check']['min_iou']:.4f}) -> "
                                                   f"{'accepted' if s['int8_accepted'] else 'refused'}")
        print(f"site {p}: {s['decoder_graph']} {s['decoder_mb']:.1f} MB, site {s['site_without_ort_mb']:.1f} MB + onnxruntime-web "
              f"{s['onnxruntime_web_mb']:.1f} MB; ONNX Runtime (Python) {native}{gate}")
    print(f"wrote {args.out / 'bench_web.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
