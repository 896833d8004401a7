"""Trainable parameter counts of a model type + PEFT config (no weights needed)."""

from __future__ import annotations

import torch

from ..models import build_sam_architecture, is_sam2_type
from .apply import apply_peft, count_trainable_parameters
from .config import PeftConfig


def count_for_config(model_type: str, config: PeftConfig, image_size: int | None = None) -> dict[str, int]:
    """Builds the architecture on the meta device, so vit_h costs no memory or time (SAM 2: on the CPU)."""
    if is_sam2_type(model_type):  # Hiera reads its drop-path rates with .item(): not on the meta device
        from ..models.sam2 import build_sam2_model

        return _count(build_sam2_model(model_type, image_size), config)
    with torch.device("meta"):
        return _count(build_sam_architecture(model_type, image_size), config)


def _count(sam: torch.nn.Module, config: PeftConfig) -> dict[str, int]:
    if config.method == "qlora":  # same trainables as LoRA; bitsandbytes is not needed to count
        from dataclasses import replace

        config = replace(config, method="lora")
    apply_peft(sam, config)
    return count_trainable_parameters(sam)
