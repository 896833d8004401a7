"""Stage 2, peft: the paper's PEFT methods (one file each, one registry), exact merge, adapter files.

May import: models, runtime.intensity, errors, fsutil (and torch, segment_anything, safetensors).
"""

from .adaptformer import AdaptFormerMLP
from .adapters import AdaptedModel, build_adapted_model, load_adapter, load_model_source, save_adapter
from .apply import (
    apply_peft,
    check_config,
    count_trainable_parameters,
    has_unmergeable_layers,
    merge_peft,
    trainable_state,
)
from .base import MergeableLayer, replace_module
from .config import LORA_TARGETS, PeftConfig, parse_targets, resolve_blocks
from .registry import PEFT_METHODS, PeftMethod, get_method

__all__ = [
    "AdaptFormerMLP",
    "AdaptedModel",
    "build_adapted_model",
    "load_adapter",
    "load_model_source",
    "save_adapter",
    "LORA_TARGETS",
    "MergeableLayer",
    "PEFT_METHODS",
    "PeftConfig",
    "PeftMethod",
    "apply_peft",
    "check_config",
    "count_trainable_parameters",
    "get_method",
    "has_unmergeable_layers",
    "merge_peft",
    "parse_targets",
    "replace_module",
    "resolve_blocks",
    "trainable_state",
]
