"""Shared by test_tiled*.py and test_distributed*.py: one tiny export with an instance decoder
(model input 128) per test session, and a nuclei mosaic larger than a tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peft_export.data import synthetic_mosaic


def ais_export_dir(tmp_path_factory) -> Path:
    """The tiny LoRA + instance-decoder export of test_ais_runtime (fp32), built once per session."""
    out = tmp_path_factory.getbasetemp() / "tiled_ais_export"
    if not (out / "manifest.json").is_file():
        import torch

        from peft_export.export import merge_and_export
        from test_ais_runtime import ais_adapted

        torch.set_num_threads(1)
        merge_and_export(ais_adapted(), out, precisions=("fp32",), progress=False)
    return out


def nuclei_mosaic(h: int, w: int, seed: int = 0, uint8: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An h x w image of the demo's nuclei at native scale (256-px synthetic samples side by
    side) and its instance labels (unique over the mosaic)."""
    image, labels = synthetic_mosaic(h, w, seed, row_seed_stride=100)
    if uint8:
        image = (image.astype(np.float64) / max(int(image.max()), 1) * 255).astype(np.uint8)
    return image, labels
