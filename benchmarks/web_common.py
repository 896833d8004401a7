"""What the browser benchmarks (bench_web.py, bench_web_encoder.py) share: logging, the load
average, a random export, and driving one site in chromium over ``peft_export.web.serve``."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def make_export(out: Path, model_type: str, size: int, precisions: tuple[str, ...], what: str) -> Path:
    """A random-weight export OUT/export_<model_type>_<size>, reused when it is there already."""
    export = out / f"export_{model_type}_{size}"
    if (export / "manifest.json").is_file():
        return export
    from peft_export.export import merge_and_export
    from peft_export.peft import PeftConfig
    from peft_export.peft.adapters import build_adapted_model

    log(f"exporting a random {model_type} at {size} ({what}) ...")
    adapted = build_adapted_model(PeftConfig(method="freeze-encoder"), model_type, None, size, seed=0)
    merge_and_export(adapted, export, precisions=precisions, progress=False)
    return export


def drive(driver: Path, site: Path, isolate: bool, plan: dict, work: Path, tag: str, timeout_s: int) -> dict:
    """Serve `site`, run the node `driver` on `plan` (plus the page's url), return its JSON result."""
    from peft_export.web.serve import make_server

    httpd = make_server(site, port=0, isolate=isolate, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        plan = {"url": f"http://127.0.0.1:{httpd.server_address[1]}/index.html", **plan}
        (work / f"{tag}.plan.json").write_text(json.dumps(plan))
        t = time.perf_counter()
        proc = subprocess.run(["node", str(driver), str(work / f"{tag}.plan.json")], capture_output=True,
                              text=True, cwd=ROOT, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{tag}: driver failed: {proc.stderr[-2000:]}")
        result = json.loads(proc.stdout)
        result["wall_s"] = round(time.perf_counter() - t, 1)
        return result
    finally:
        httpd.shutdown()
        httpd.server_close()
