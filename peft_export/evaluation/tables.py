"""Presenting evaluation results: one row per model, aligned text, markdown, Dice-per-iteration plot."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import PeftExportError
from ..fsutil import atomic_file


def summary_rows(results_by_model: dict[str, dict]) -> list[dict]:
    """One table row per model from ``evaluate_interactive`` (and optionally automatic) results.

    A model's value may be the interactive result itself or ``{"interactive": ..., "automatic": ...}``.
    """
    rows = []
    for model, res in results_by_model.items():
        inter = res.get("interactive", res if "metrics" in res else None)
        auto = res.get("automatic", res if "msa" in res and "metrics" not in res else None)
        row: dict[str, Any] = {"model": model}
        if inter is not None:
            row["objects"] = inter["n_objects"]
            for k, v in inter["metrics"].items():
                row[f"dice_{k}"] = v["dice"]
        if auto is not None:
            row["msa"] = auto["msa"]
            row["sa50"] = auto["sa50"]
        if "ais" in res:  # micro-sam's automatic instance segmentation (None: the model has no decoder)
            row["ais_msa"] = res["ais"]["msa"] if res["ais"] else None
            row["ais_sa50"] = res["ais"]["sa50"] if res["ais"] else None
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}"
    return str(v)


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def format_table(rows: Sequence[dict]) -> str:
    """Rows of dicts as an aligned plain-text table (floats with 4 decimals; missing -> '-')."""
    if not rows:
        return ""
    cols = _columns(rows)
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        # Text left-aligned, numbers right-aligned, as in most result tables.
        parts = []
        for v, w, i in zip(values, widths, range(len(cols))):
            numeric = all(_is_number(r.get(cols[i])) for r in rows)
            parts.append(v.rjust(w) if numeric else v.ljust(w))
        return "  ".join(parts).rstrip()

    out = [line(cols), "  ".join("-" * w for w in widths)]
    out.extend(line(c) for c in cells)
    return "\n".join(out)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))


def to_markdown(rows: Sequence[dict]) -> str:
    """Rows of dicts as a GitHub markdown table."""
    if not rows:
        return ""
    cols = _columns(rows)
    out = ["| " + " | ".join(cols) + " |",
           "|" + "|".join("---:" if all(_is_number(r.get(c)) for r in rows) else "---" for c in cols) + "|"]
    out.extend("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows)
    return "\n".join(out)


def plot_curves(results_by_model: dict[str, dict], out_png: str, overwrite: bool = False,
                metric: str = "dice") -> None:
    """Plot Dice (or IoU) against iteration: one line per model and start prompt, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"point": "-o", "box": "--s"}
    n_lines = 0
    for model, res in results_by_model.items():
        inter = res.get("interactive", res)
        for key, m in inter.get("metrics", {}).items():
            if not key.startswith("iterative_"):
                continue
            curve = m.get(f"{metric}_curve")
            if not curve:
                continue
            start = key.split("_", 1)[1]
            ax.plot(range(len(curve)), curve, styles.get(start, "-"), label=f"{model} ({start})", markersize=4)
            n_lines += 1
    if n_lines == 0:
        plt.close(fig)
        raise PeftExportError(f"{out_png}: no iterative prompting results to plot")
    ax.set_xlabel("iteration (0 = initial prompt)")
    ax.set_ylabel(metric.capitalize() if metric != "iou" else "IoU")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out_png, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
