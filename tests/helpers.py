"""Test helpers: tiny random SAM models with random, non-zero adapters."""

from __future__ import annotations

import warnings

import torch

from peft_export.peft.adapters import AdaptedModel, build_adapted_model
from peft_export.peft import PeftConfig

warnings.filterwarnings("ignore", message="no checkpoint given")

# Every mergeable method with options that exercise all its code paths.
MERGEABLE_CONFIGS = {
    "lora": dict(method="lora", rank=4, targets=("q", "k", "v", "mlp"), blocks="late", alpha=1.0),
    "lora-qv-alpha": dict(method="lora", rank=3, targets=("q", "v"), blocks="all", alpha=2.5),
    "fact": dict(method="fact", rank=4, blocks="all"),
    "ssf": dict(method="ssf", blocks="1-3"),
    "attention": dict(method="attention", blocks="late"),
    "bias": dict(method="bias", blocks="all"),
    "layernorm": dict(method="layernorm", blocks="0,2"),
    "full": dict(method="full", blocks="late"),
    "freeze-encoder": dict(method="freeze-encoder"),
}


def randomize_trainables(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Random, non-zero values for every trainable tensor: zero-initialised adapters prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g) * scale
            if name.endswith(".scale") or name.endswith(".alpha"):
                p.copy_(1.0 + 4 * noise)  # multiplicative: around 1
            elif "w_b_linear" in name or "FacTv" in name or "up_proj" in name:
                p.copy_(noise * 4)
            else:
                p.add_(noise)


def make_adapted(config: dict, image_size: int | None = None, seed: int = 0) -> AdaptedModel:
    adapted = build_adapted_model(PeftConfig(**config), "tiny", None, image_size, seed=seed)
    randomize_trainables(adapted.model, seed=seed + 10)
    adapted.model.eval()
    return adapted


def fake_cv2():
    """cv2.connectedComponentsWithStats from scipy, so segment_anything's small-region code runs without cv2."""
    import types

    import numpy as np
    from scipy import ndimage

    def connected(img, connectivity):
        labels, n = ndimage.label(img, structure=np.ones((3, 3)))
        stats = np.zeros((n + 1, 5), np.int64)
        stats[:, 4] = np.bincount(labels.ravel(), minlength=n + 1)
        return n + 1, labels, stats, None

    return types.SimpleNamespace(connectedComponentsWithStats=connected)
