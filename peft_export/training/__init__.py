"""Finetuning SAM with PEFT methods: micro-sam's prompts and loss, resumable, DDP-ready.

    from peft_export.training import TrainConfig, finetune
    summary = finetune(TrainConfig(out="run", data="data", model_type="vit_b", checkpoint="sam_vit_b.pth"))
"""

from .loop import (
    TrainConfig,
    Trainer,
    encode_with_frozen_prefix,
    finetune,
    first_trainable_block,
    preprocess_patches,
    validate,
    validation_set,
)

__all__ = [
    "TrainConfig", "Trainer", "encode_with_frozen_prefix", "finetune", "first_trainable_block",
    "preprocess_patches", "validate", "validation_set",
]
