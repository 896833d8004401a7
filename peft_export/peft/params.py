"""Trainable parameter counts of a model type + PEFT config (no weights needed)."""

from __future__ import annotations

import torch

from ..models import build_sam_architecture
from .apply import apply_peft, count_trainable_parameters
from .config import PeftConfig


def count_for_config(model_type: str, config: PeftConfig, image_size: int | None = None) -> dict[str, int]:
    """Builds the architecture on the meta device, so vit_h costs no memory or time."""
    with torch.device("meta"):
        sam = build_sam_architecture(model_type, image_size)
        if config.method == "qlora":  # same trainables as LoRA; bitsandbytes is not needed to count
            from dataclasses import replace

            config = replace(config, method="lora")
        apply_peft(sam, config)
    return count_trainable_parameters(sam)
