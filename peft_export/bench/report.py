"""Bench results as people read them: ratios against the reference case, tables, markdown, plots, and
one table across several runs (bench-compare)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import PeftExportError
from ..fsutil import atomic_file
from .cases import BENCH_FORMAT, BENCH_FORMAT_VERSION
from .load import describe_load


# ---- aggregation ----------------------------------------------------------------------------


TORCH_BACKENDS = ("torch", "torch-compile")


def pick_reference(cases: Sequence[dict]) -> dict[str, str]:
    """The case each component's ratios are against: the fastest torch case that timed it (eager or
    compiled, any model and precision, freed memory kept or not), so that no ratio is against a torch
    slower than torch can be on this machine; a component no torch case timed is against the first
    case that timed it. {component: case name}; empty when nothing ran."""
    ok = [c for c in cases if c.get("status") == "ok" and c.get("components")]
    reference: dict[str, str] = {}
    for comp in dict.fromkeys(k for c in ok for k in c["components"]):
        timed = [c for c in ok if c["components"].get(comp, {}).get("median_ms")]
        torch = [c for c in timed if c["backend"] in TORCH_BACKENDS]
        if torch or timed:
            reference[comp] = min(torch, key=lambda c: c["components"][comp]["median_ms"])["case"] if torch \
                else timed[0]["case"]
    return reference


def reference_of(reference: str | dict | None, component: str) -> str | None:
    """The reference case of one component (bench format 2: per component; 1: one case for all)."""
    return reference.get(component) if isinstance(reference, dict) else reference


def describe_reference(result: dict) -> str:
    """'ratio = median / median of merged torch fp32 (freed memory kept) (encoder, end_to_end); ...'."""
    reference = result.get("reference")
    if not reference:
        return "no case ran, so no ratios"
    if not isinstance(reference, dict):
        return f"ratio = median / median of '{reference}'"
    by_case: dict[str, list[str]] = {}
    for comp, case in reference.items():
        by_case.setdefault(case, []).append(comp)
    torch = {c["case"] for c in result.get("cases", []) if c.get("backend") in TORCH_BACKENDS}
    parts = [f"'{case}' ({', '.join(comps)})" for case, comps in by_case.items()]
    what = "the fastest torch case timed here" if set(by_case) <= torch else "the fastest torch case (else the first case)"
    return f"ratio = median / median of {what}: {'; '.join(parts)}"


def add_ratios(cases: list[dict], reference: str | dict | None) -> list[dict]:
    """Set ``ratio_vs_reference`` (median / reference median, same component) on every timed component;
    ``reference``: one case for every component, or {component: case} (``pick_reference``)."""
    by_name = {c["case"]: c for c in cases}
    for c in cases:
        for comp, stats in c.get("components", {}).items():
            ref = by_name.get(reference_of(reference, comp))
            base = (ref or {}).get("components", {}).get(comp)
            if base and base.get("median_ms"):
                stats["ratio_vs_reference"] = round(stats["median_ms"] / base["median_ms"], 4)
            else:
                stats["ratio_vs_reference"] = None
    return cases


def ratio(cases: Sequence[dict], numerator: str, denominator: str, component: str = "encoder") -> float | None:
    """median(numerator) / median(denominator) for one component; None if either is missing."""
    by = {c["case"]: c for c in cases}
    try:
        a = by[numerator]["components"][component]["median_ms"]
        b = by[denominator]["components"][component]["median_ms"]
    except KeyError:
        return None
    return a / b if b else None


def table_rows(result: dict, run_label: str | None = None) -> list[dict]:
    """One row per (case, component) that ran; skipped/failed cases one row each with the reason."""
    rows = []
    for c in result.get("cases", []):
        if c["status"] != "ok":
            rows.append({"run": run_label, "case": c["case"], "component": "-", "status": c["status"],
                         "reason": c.get("reason")})
            continue
        load = c.get("load") or result.get("load")
        for comp, s in c["components"].items():
            rows.append({"run": run_label, "case": c["case"], "component": comp, "status": "ok",
                         "median_ms": s["median_ms"], "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"],
                         "throughput": s["throughput_per_s"], "unit": s.get("throughput_unit", "images/s"),
                         "peak_mb": s.get("peak_mb"), "process_peak_mb": (c.get("process") or {}).get("peak_rss_mb"),
                         "ratio": s.get("ratio_vs_reference"), "busy": _busy_cell(load)})
    return rows


def _busy_cell(load: dict | None) -> str:
    """'BUSY 35%' when other processes (or the hypervisor) took CPU during the case, '' when quiet, '?' unknown."""
    if not load or load.get("busy") is None:
        return "?"
    if not load["busy"]:
        return ""
    return f"BUSY {100 * max(load['others_cpu_fraction'], load['steal_fraction']):.0f}%"


def busy_warnings(result: dict) -> list[str]:
    """One line per case (or for the whole in-process run) that ran while the machine was busy."""
    lines = []
    for c in result.get("cases", []):
        if (c.get("load") or {}).get("busy"):
            lines.append(f"warning: {c['case']} ran while the machine was busy ({describe_load(c['load'])}); "
                         "its figures are not comparable")
    if not lines and (result.get("load") or {}).get("busy"):
        lines.append(f"warning: the machine was busy during this run ({describe_load(result['load'])}); "
                     "the figures are not comparable")
    return lines


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return f"{x:.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return str(x)


_COLUMNS = ("case", "component", "median ms", "p90 ms", "p99 ms", "throughput /s", "peak MB", "process peak MB",
            "ratio", "machine")


def _cells(row: dict, with_run: bool) -> list[str]:
    if row["status"] != "ok":
        cells = [row["case"], "-", f"{row['status']}: {row.get('reason') or ''}"] + [""] * (len(_COLUMNS) - 3)
    else:
        cells = [row["case"], row["component"], _fmt(row["median_ms"]), _fmt(row["p90_ms"]), _fmt(row["p99_ms"]),
                 f"{_fmt(row['throughput'])} {'prompts' if row['unit'] == 'prompts/s' else 'img'}",
                 _fmt(row["peak_mb"], 0), _fmt(row.get("process_peak_mb"), 0), _fmt(row["ratio"], 3),
                 row.get("busy") or ""]
    return ([row.get("run") or ""] if with_run else []) + cells


def format_rows(rows: Sequence[dict], markdown: bool = False, with_run: bool = False) -> str:
    header = (["run"] if with_run else []) + list(_COLUMNS)
    body = [_cells(r, with_run) for r in rows]
    if markdown:
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in body]
        return "\n".join(lines)
    ok_body = [c for c, r in zip(body, rows) if r["status"] == "ok"]
    widths = [max([len(h)] + [len(c[i]) for c in ok_body]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for cells, r in zip(body, rows):
        if r["status"] == "ok":
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    for r in rows:
        if r["status"] != "ok":
            prefix = f"[{r['run']}] " if with_run and r.get("run") else ""
            lines.append(f"{r['status']}: {prefix}{r['case']} -- {r.get('reason')}")
    return "\n".join(lines)


def describe_machine(result: dict) -> str:
    dev = result.get("machine", {})
    gpu = dev.get("gpu")
    cpu = f"{dev.get('cpu')} ({dev.get('cpu_count_usable')} cores usable, {dev.get('ram_gb')} GB RAM)"
    if gpu and result.get("settings", {}).get("device") == "cuda":
        return (f"{gpu.get('name')} (driver {gpu.get('driver_version')}, CUDA {gpu.get('cuda_version')}); host {cpu}")
    return cpu


def format_table(result: dict, markdown: bool = False) -> str:
    """The printed / markdown table of one bench result, with a header naming machine and settings."""
    st = result.get("settings", {})
    ver = result.get("versions", {})
    mode = (", interleaved in one process (ONNX Runtime's threads do not spin between calls)" if st.get("interleave") else
            ", each case in a fresh process" if st.get("fresh_process") else ", one process")
    label = f" [{result['label']}]" if result.get("label") else ""
    head = (f"peftexport bench{label} {result.get('date', '')} -- {describe_machine(result)}\n"
            f"model {st.get('model_type')} at {st.get('image_size')}px, device {st.get('device')}, "
            f"warm-up {st.get('warmup')}, iterations {st.get('iterations')}{mode}; "
            f"machine load during the run: {describe_load(result.get('load'))}; "
            + f"{describe_reference(result)}; "
            + ", ".join(f"{k} {v}" for k, v in ver.items() if v))
    table = format_rows(table_rows(result), markdown=markdown)
    warnings = busy_warnings(result)
    if markdown:
        return (f"{head}\n\n{table}\n" + "".join(f"\n- {w}" for w in warnings) + ("\n" if warnings else "")
                + f"\n{COMPONENTS_LEGEND}\n")
    return "\n".join([head, table] + warnings)


# What each component times, so the columns can be read against each other (bench.md's last line).
COMPONENTS_LEGEND = (
    "encoder: the image encoder on a preprocessed input. decoder_point / decoder_box: prompt encoder + mask "
    "decoder on a cached embedding, one prompt, three masks (exports: as SamSession.predict, the decoder family: "
    "split_prompts + split_masks; decoder_lowres on TensorRT engines). decoder_boxes_bN: N boxes in one call (exports: as predict_batch, the "
    "family: split_prompts + split_masks, split_image once per image with the embedding). "
    "end_to_end: what a user waits for per image: preprocessing, encoder, one box, one mask upscaled to the "
    "image. Each is a median of its own calls, so end to end can come out a little under encoder + decoder.")


def _run_label(result: dict, path: str | Path, label: str | None = None) -> str:
    dev = result.get("machine", {})
    gpu = dev.get("gpu") if result.get("settings", {}).get("device") == "cuda" else None
    where = gpu.get("name") if gpu else f"{dev.get('cpu', '?')} x{dev.get('cpu_count_usable', '?')}"
    return f"{label or result.get('label') or Path(path).stem} ({where})"


def read_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PeftExportError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise PeftExportError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != BENCH_FORMAT:
        raise PeftExportError(f"{path}: not a peftexport bench result (format is not '{BENCH_FORMAT}')")
    if data.get("format_version", 0) > BENCH_FORMAT_VERSION:
        raise PeftExportError(f"{path}: bench format {data['format_version']} is newer than this peftexport; upgrade")
    return data


def compare_results(paths: Sequence[str | Path], markdown: bool = False, labels: Sequence[str] | None = None) -> str:
    """One table across several bench JSON files (runs / machines); each row names its run.

    ``labels``: one per file, in order (default: each run's own label, else the file name).
    """
    if not paths:
        raise PeftExportError("bench-compare: give at least one bench JSON file")
    labels = list(labels or [])
    if labels and len(labels) != len(paths):
        raise PeftExportError(f"--label: {len(labels)} label(s) for {len(paths)} file(s); give one per file")
    if len(set(labels)) != len(labels):
        raise PeftExportError("--label: labels must differ, or the runs cannot be told apart")
    rows, notes = [], []
    for i, p in enumerate(paths):
        res = read_result(p)
        label = _run_label(res, p, labels[i] if labels else None)
        st = res.get("settings", {})
        notes.append(f"{label}: {res.get('date', '?')}, {describe_machine(res)}, {st.get('model_type')} at "
                     f"{st.get('image_size')}px, device {st.get('device')}, {describe_reference(res)}, "
                     f"machine load {describe_load(res.get('load'))}")
        rows.extend(table_rows(res, run_label=label))
    head = "\n".join(("- " if markdown else "") + n for n in notes)
    return f"{head}\n\n{format_rows(rows, markdown=markdown, with_run=True)}\n"


def write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    with atomic_file(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json(path: str | Path, result: dict, overwrite: bool = True) -> Path:
    return write_text(path, json.dumps(result, indent=2, default=str) + "\n", overwrite)


def write_plot(path: str | Path, result: dict, overwrite: bool = True) -> Path:
    """Horizontal bars of median latency per case, one panel per component (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in result.get("cases", []) if c["status"] == "ok" and c["components"]]
    comps: list[str] = []
    for c in ok:
        comps += [k for k in c["components"] if k not in comps]
    if not comps:
        raise PeftExportError(f"{path}: nothing was timed, no plot to draw")
    n_cases = max(len(ok), 1)
    fig, axes = plt.subplots(len(comps), 1, figsize=(9, 1.0 + len(comps) * (0.9 + 0.32 * n_cases)), squeeze=False)
    for ax, comp in zip(axes[:, 0], comps):
        names = [c["case"] for c in ok if comp in c["components"]]
        med = [c["components"][comp]["median_ms"] for c in ok if comp in c["components"]]
        p90 = [c["components"][comp]["p90_ms"] for c in ok if comp in c["components"]]
        y = np.arange(len(names))
        colors = ["tab:gray" if n == reference_of(result.get("reference"), comp) else "tab:blue" for n in names]
        ax.barh(y, med, color=colors, xerr=[np.zeros(len(med)), np.maximum(np.subtract(p90, med), 0)], capsize=2)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(comp, fontsize=9, loc="left")
        ax.set_xlabel("median latency, ms (error bar to p90)", fontsize=8)
        # Labels start right of the error bar's end (p90), never on the bar or its whisker.
        ends = np.maximum(p90, med)
        pad = 0.01 * float(max(ends))
        for yi, m, end in zip(y, med, ends):
            ax.text(end + pad, yi, f"{m:.4g} ms", va="center", ha="left", fontsize=7)
        ax.set_xlim(0, float(max(ends)) * 1.22)
    st = result.get("settings", {})
    fig.suptitle(f"{st.get('model_type')} {st.get('image_size')}px on {describe_machine(result)}; "
                 "grey: each component's reference (the fastest torch case)", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, overwrite=overwrite) as tmp:
        fig.savefig(str(tmp), dpi=110, format="png")
    plt.close(fig)
    return Path(path)


