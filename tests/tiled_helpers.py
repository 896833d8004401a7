"""Shared by test_tiled*.py and test_distributed*.py: one tiny export with an instance decoder
(model input 128) per test session, and a nuclei mosaic larger than a tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peft_export.data import synthetic_sample


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
    image = np.zeros((h, w), np.uint16)
    labels = np.zeros((h, w), np.int32)
    k = 0
    for i, y in enumerate(range(0, h, 256)):
        for j, x in enumerate(range(0, w, 256)):
            img, lab = synthetic_sample(256, seed=seed + 100 * i + j)
            hh, ww = min(256, h - y), min(256, w - x)
            image[y:y + hh, x:x + ww] = img[:hh, :ww]
            lab = lab[:hh, :ww].astype(np.int32)
            labels[y:y + hh, x:x + ww] = np.where(lab > 0, lab + k, 0)
            k += int(lab.max())
    if uint8:
        image = (image.astype(np.float64) / max(int(image.max()), 1) * 255).astype(np.uint8)
    return image, labels
