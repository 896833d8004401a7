"""The resumable training checkpoint (``RUN_DIR/last/checkpoint.pt``).

Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: no pickled code runs when a run is resumed.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..errors import PeftExportError
from ..fsutil import atomic_file
from ..models import read_checkpoint

CHECKPOINT_FORMAT = "peftexport-train-checkpoint"
CHECKPOINT_VERSION = 1
LAST_DIR = "last"
CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) global RNG states as tensors / plain lists."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LAST_DIR / CHECKPOINT_FILE


def save_checkpoint(run_dir: str | Path, payload: dict) -> Path:
    """Write ``run_dir/last/checkpoint.pt`` atomically (a crash leaves the previous one)."""
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **payload}
    with atomic_file(path, overwrite=True) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(run_dir: str | Path) -> dict:
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise PeftExportError(f"{path}: no checkpoint to resume from (was {run_dir} written by finetune?)")
    payload = read_checkpoint(path)  # weights_only, one-line errors for truncated / pickled files
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise PeftExportError(f"{path}: not a peftexport training checkpoint")
    if payload.get("format_version", 0) > CHECKPOINT_VERSION:
        raise PeftExportError(f"{path}: checkpoint format {payload['format_version']} is newer than this peftexport")
    return payload
