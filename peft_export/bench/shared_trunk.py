"""N adapters on one image: one export sharing a trunk against N separate exports, each case in a fresh process.

Cases (the runtime's public API, as an application calls it):

* ``shared``: one ``SamSession`` on the export of several adapters. Per image:
  ``encode(image)`` (preprocessing + trunk), then each adapter's head
  (``EncodedImage.embedding``), then one box per adapter through its decoder.
* ``separate``: one ``SamSession`` per single export. Per image: each session's
  ``encode(image)`` (preprocessing + whole encoder), then one box each.

Each case runs in its own Python process (``python -m peft_export.bench.shared_trunk CASE.json``)
so that its peak RSS (``VmHWM``: loading included) is its own. Reported per case: load time,
RSS after loading, peak RSS, and the median over the timed iterations of every encoder part,
the encoder total per image, and the end-to-end total (encoders + one box per adapter).
``mask_agreement`` then compares each adapter's masks from both exports (box prompts).
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import PeftExportError
from .cases import BenchInputs
from .stats import current_rss_mb, device_info, library_versions, peak_rss_mb

FORMAT = "peftexport-bench-shared-trunk"


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_case(case: dict) -> dict:
    """Run one case in this process (the child side); returns its measurements."""
    from ..runtime import SamSession

    rss0 = current_rss_mb()
    t0 = time.perf_counter()
    threads = case.get("threads")
    if case["kind"] == "shared":
        shared = SamSession(case["export"], precision=case["precision"], intra_op_threads=threads)
        names = list(shared.adapters)
    else:
        sessions = {n: SamSession(d, precision=case["precision"], intra_op_threads=threads)
                    for n, d in case["exports"].items()}
        names = list(sessions)
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mb()
    inputs = BenchInputs(int(case["image_size"]), seed=int(case.get("seed", 0)))
    image, box = inputs.image, inputs.image_box
    parts: dict[str, list[float]] = {}

    def add(part: str, seconds: float) -> None:
        parts.setdefault(part, []).append(seconds)

    for it in range(case["warmup"] + case["iterations"]):
        record = add if it >= case["warmup"] else (lambda part, seconds: None)
        t_image = time.perf_counter()
        if case["kind"] == "shared":
            encoded = None

            def trunk():
                nonlocal encoded
                encoded = shared.encode(image)

            record("trunk", _timed(trunk))
            for n in names:
                record(f"head {n}", _timed(lambda n=n: encoded.embedding(n)))
            t_enc = time.perf_counter() - t_image
            for n in names:
                shared.predict(box=box, multimask_output=False, embedding=encoded, adapter=n)
        else:
            embeddings = {}
            for n in names:
                record(f"encoder {n}", _timed(lambda n=n: embeddings.__setitem__(n, sessions[n].encode(image))))
            t_enc = time.perf_counter() - t_image
            for n in names:
                sessions[n].predict(box=box, multimask_output=False, embedding=embeddings[n])
        record("encoder total", t_enc)
        record("end to end", time.perf_counter() - t_image)
    return {
        "kind": case["kind"], "adapters": names, "precision": case["precision"], "load_s": round(load_s, 3),
        "rss_start_mb": round(rss0, 1), "rss_loaded_mb": round(rss_loaded, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "median_s": {k: round(float(np.median(v)), 4) for k, v in parts.items()},
        "times_s": {k: [round(t, 4) for t in v] for k, v in parts.items()},
    }


def run_in_fresh_process(case: dict, timeout: float | None = None) -> dict:
    """``run_case`` in a new Python process (its peak RSS is its own)."""
    proc = subprocess.run([sys.executable, "-m", "peft_export.bench.shared_trunk", json.dumps(case)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PeftExportError(f"bench case {case['kind']}: the child process failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mask_agreement(shared_export: str | Path, separate: Mapping[str, str | Path], precision: str = "fp32",
                   image_size: int | None = None, n_boxes: int = 8, seed: int = 0) -> dict[str, float]:
    """{adapter: lowest mask IoU over ``n_boxes`` seeded boxes}, shared export vs that adapter's own export."""
    from ..runtime import SamSession, read_manifest

    size = image_size or int(read_manifest(shared_export)["image_size"])
    inputs = BenchInputs(size, batch_sizes=(n_boxes,), seed=seed)
    h, w = inputs.image.shape[:2]
    boxes = inputs.boxes[n_boxes] * np.asarray([w / size, h / size, w / size, h / size], np.float32)
    out = {}
    for name, export in separate.items():
        a = SamSession(shared_export, precision=precision, adapters=[name])
        b = SamSession(export, precision=precision)
        ma = a.predict_batch(boxes=boxes, embedding=a.encode(inputs.image))[0][:, 0]
        mb = b.predict_batch(boxes=boxes, embedding=b.encode(inputs.image))[0][:, 0]
        inter = (ma & mb).sum(axis=(1, 2))
        union = (ma | mb).sum(axis=(1, 2))
        out[name] = float(np.min(np.where(union == 0, 1.0, inter / np.maximum(union, 1))))
        del a, b
    return out


def holds_several_adapters(export: str | Path | None) -> bool:
    """Whether ``export`` is an export of several adapters (the cases of this module apply)."""
    from ..runtime import read_manifest

    return export is not None and bool(read_manifest(export).get("adapters"))


def run_and_write_shared(json_out: str | Path | None = None, markdown_out: str | Path | None = None,
                         overwrite: bool = False, **kwargs) -> dict:
    """``bench_shared_trunk`` then the JSON and markdown files asked for (paths checked first)."""
    from ..fsutil import check_can_write
    from .report import write_json, write_text

    for p in (json_out, markdown_out):
        if p is not None:
            check_can_write(p, overwrite)
    result = bench_shared_trunk(**kwargs)
    if json_out is not None:
        write_json(json_out, result, overwrite)
    if markdown_out is not None:
        write_text(markdown_out, format_shared_table(result, markdown=True), overwrite)
    return result


def bench_shared_trunk(
    shared_export: str | Path | None,
    separate: Mapping[str, str | Path] | Sequence[str] | None = None,
    precision: str = "fp32",
    warmup: int = 1,
    iterations: int = 3,
    threads: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Time the shared export (and N separate exports, if given) in fresh processes; returns the result."""
    from ..runtime import read_manifest

    if shared_export is None:
        raise PeftExportError("--separate: give the export of several adapters as EXPORT_DIR")
    manifest = read_manifest(shared_export)
    names = list(manifest.get("adapters") or {})
    if not names:
        raise PeftExportError(f"{shared_export}: not an export of several adapters (no 'adapters' in manifest.json)")
    if separate is not None and not isinstance(separate, Mapping):
        separate = parse_separate(separate)
    separate = {n: str(d) for n, d in (separate or {}).items()}
    missing = sorted(set(separate) - set(names))
    if missing:
        raise PeftExportError(f"--separate {missing[0]}: the shared export has no adapter of that name "
                              f"(it holds {', '.join(names)})")
    if separate and set(separate) != set(names):
        raise PeftExportError(f"--separate: give one export per adapter ({', '.join(names)}) so totals compare")
    size = int(manifest["image_size"])
    for n, d in separate.items():
        other = read_manifest(d)
        if "adapters" in other or int(other["image_size"]) != size:
            raise PeftExportError(f"--separate {n}={d}: not a single export of image size {size}")
    common = dict(precision=precision, warmup=warmup, iterations=iterations, threads=threads, image_size=size,
                  seed=seed)
    cases = []
    log(f"timing shared ({len(names)} adapters) in a fresh process")
    cases.append(run_in_fresh_process(dict(common, kind="shared", export=str(shared_export))))
    agreement = None
    if separate:
        log(f"timing {len(separate)} separate exports in a fresh process")
        cases.append(run_in_fresh_process(dict(common, kind="separate", exports={n: separate[n] for n in names})))
        log("comparing masks of every adapter (shared vs its own export)")
        agreement = mask_agreement(shared_export, separate, precision, size, seed=seed)
    result = {
        "format": FORMAT, "format_version": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": device_info(), "versions": library_versions(), "load_average": _loadavg(),
        "settings": {**common, "shared_export": str(shared_export), "separate": separate,
                     "split_block": (manifest.get("shared_trunk") or {}).get("split_block"),
                     "model_type": manifest.get("model_type")},
        "cases": cases, "mask_iou_min": agreement,
    }
    if len(cases) == 2:
        sh, sep = cases
        result["ratios"] = {
            "encoder_total": round(sh["median_s"]["encoder total"] / sep["median_s"]["encoder total"], 3),
            "end_to_end": round(sh["median_s"]["end to end"] / sep["median_s"]["end to end"], 3),
            "peak_rss": round(sh["peak_rss_mb"] / sep["peak_rss_mb"], 3),
        }
    return result


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in __import__("os").getloadavg()]
    except OSError:
        return None


def format_shared_table(result: dict, markdown: bool = False) -> str:
    """One row per case and part: median seconds; then load, memory and the ratios."""
    rows = []
    for case in result["cases"]:
        for part, sec in case["median_s"].items():
            rows.append((case["kind"], part, f"{sec:.3f}"))
        rows.append((case["kind"], "load", f"{case['load_s']:.3f}"))
        rows.append((case["kind"], "peak RSS (MB)", f"{case['peak_rss_mb']:.0f}"))
    head = ("case", "part", "median s")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|---|---:|"] + ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(3)]
        lines = ["  ".join(str(c).ljust(widths[i]) if i < 2 else str(c).rjust(widths[i]) for i, c in enumerate(r))
                 for r in [head] + rows]
    for key, value in (result.get("ratios") or {}).items():
        lines.append(f"{'' if not markdown else '- '}shared / separate, {key.replace('_', ' ')}: {value:.3f}")
    for name, iou in (result.get("mask_iou_min") or {}).items():
        lines.append(f"{'' if not markdown else '- '}mask IoU {name}, shared vs own export (min over boxes): {iou:.4f}")
    return "\n".join(lines)


def parse_separate(texts: Sequence[str]) -> dict[str, str]:
    """``NAME=EXPORT`` entries of ``--separate``."""
    out = {}
    for t in texts:
        name, eq, path = t.partition("=")
        if not eq or not name or not path:
            raise PeftExportError(f"--separate {t}: expected NAME=EXPORT_DIR")
        if name in out:
            raise PeftExportError(f"--separate {t}: {name} is given twice")
        out[name] = path
    return out


if __name__ == "__main__":  # the child process of run_in_fresh_process
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
