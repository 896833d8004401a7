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


def _cell(v: Any, float_format: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:{float_format}}"
    return str(v)


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def format_table(rows: Sequence[dict], float_format: str = ".4f") -> str:
    """Rows of dicts as an aligned plain-text table (floats with 4 decimals, or ``float_format``,
    e.g. ``.4g`` for 4 significant digits; missing -> '-')."""
    if not rows:
        return ""
    cols = _columns(rows)
    cells = [[_cell(r.get(c), float_format) for c in cols] for r in rows]
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
                metric: str = "dice", title: str | None = None) -> None:
    """Dice (or IoU) against corrective iteration: one line per model and start prompt, saved as PNG.

    Each model has its own colour and marker, the start prompt its line style (point solid, box
    dashed), and each model's points sit slightly apart on the x axis, so models with identical
    curves (a merged model and its fp32 export) stay visible instead of hiding each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = []
    for model, res in results_by_model.items():
        inter = res.get("interactive", res)
        for key, m in inter.get("metrics", {}).items():
            curve = m.get(f"{metric}_curve") if key.startswith("iterative_") else None
            if curve:
                curves.append((model, key.split("_", 1)[1], curve))
    if not curves:
        raise PeftExportError(f"{out_png}: no iterative prompting results to plot")
    models = list(dict.fromkeys(model for model, _, _ in curves))
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xh<>"
    spread = 0.25  # total x offset across models, in iterations
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, start, curve in curves:
        i = models.index(model)
        shift = (i - (len(models) - 1) / 2) * (spread / max(len(models) - 1, 1))
        ax.plot(np.arange(len(curve)) + shift, curve, linestyle="-" if start == "point" else "--",
                marker=markers[i % len(markers)], color=colors[i % len(colors)], markersize=5, linewidth=1.5,
                alpha=0.9, label=f"{model}, from a {start}")
    n_iter = max(len(c) for _, _, c in curves)
    ax.set_xticks(range(n_iter))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, n_iter - 0.5)
    ax.set_xlabel("corrective iteration (0 = the first point or box; each adds one point)")
    name = metric.capitalize() if metric != "iou" else "IoU"
    ax.set_ylabel(f"mean {name} per object")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"Iterative prompting: {name} per corrective iteration", fontsize=10)
    ax.legend(fontsize=8, loc="best", ncol=2 if len(curves) > 6 else 1)
    fig.tight_layout()
    with atomic_file(out_png, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
