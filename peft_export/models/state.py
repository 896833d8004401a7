"""Strict state-dict loading with one readable line: shared by the SAM and the instance-decoder loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..errors import PeftExportError


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``load_state_dict(strict=True)`` with one readable line instead of a wall of keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise PeftExportError(f"{path}: weights do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
