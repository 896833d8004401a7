"""``training.png``: loss and validation curves from ``train_log.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_file


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(log_path: str | Path, out_png: str | Path) -> Path:
    """Training loss per step (and its running mean) beside validation Dice per prompt type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_log(log_path)
    steps = [e for e in entries if e.get("type") == "step"]
    vals = [e for e in entries if e.get("type") == "val" and e.get("metrics")]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    if steps:
        x = [e["step"] for e in steps]
        y = [e["loss"] for e in steps]
        ax_loss.plot(x, y, lw=0.8, alpha=0.5, label="loss")
        k = max(1, len(y) // 20)
        smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
        ax_loss.plot(x, smooth, lw=1.5, label=f"running mean ({k})")
        ax_loss.legend()
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("Dice + IoU-MSE loss")
    ax_loss.set_title("training loss")
    if vals:
        x = [e["step"] for e in vals]
        for key in ("point_dice", "box_dice", "mean_dice"):
            ax_val.plot(x, [e["metrics"].get(key) for e in vals], marker="o", ms=3, label=key.replace("_", " "))
        ax_val.legend()
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("Dice")
    ax_val.set_title("validation")
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_file(out_png, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out_png
