"""Stage 4, training: micro-sam's prompts and loss on a PEFT-adapted SAM, resumable, DDP-ready.

May import: models, peft, data, evaluation.protocol (validation), runtime, cpu_load, errors, fsutil (and torch).

    from peft_export.training import TrainConfig, finetune
    summary = finetune(TrainConfig(out="run", data="data", model_type="vit_b", checkpoint="sam_vit_b.pth"))
"""

from .config import TrainConfig, check_config
from .encoder import (
    encode_with_frozen_prefix,
    first_trainable_block,
    frozen_trunk,
    preprocess_patches,
    trainable_tail,
)
from .loop import Trainer, finetune
from .validation import load_split, validate, validation_set

__all__ = [
    "TrainConfig", "Trainer", "check_config", "encode_with_frozen_prefix", "finetune", "first_trainable_block",
    "frozen_trunk", "load_split", "preprocess_patches", "trainable_tail", "validate", "validation_set",
]
