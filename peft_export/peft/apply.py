"""Installing a PEFT method into SAM, folding it back out, and counting what trains.

    model = apply_peft(sam, PeftConfig("lora", blocks="late", rank=32, targets=("q", "k", "v", "mlp")))
    ... train ...
    plain = merge_peft(model)   # a plain segment_anything Sam with the adapters folded in

Each layer folds itself (``MergeableLayer.merged``); this module only walks the model.
"""

from __future__ import annotations

import copy

import torch
from segment_anything.modeling import Sam

from ..errors import PeftExportError
from ..models.family import encoder_trunk, model_parts
from .adaptformer import AdaptFormerMLP
from .base import MergeableLayer, replace_module
from .qlora import dequantize_4bit_linears
from .config import PeftConfig, parse_targets, resolve_blocks
from .decoder import apply_decoder_peft, check_decoder_config
from .registry import get_method


def check_config(config: PeftConfig, depth: int, late_start: int | None = None) -> list[int]:
    """Validate a config against an encoder depth; returns the resolved blocks (``late_start``: where
    ``--blocks late`` begins when not at depth // 2, see ``late_blocks_start``)."""
    method = get_method(config.method)
    if method.name in ("lora", "qlora", "fact") and (config.rank is None or config.rank <= 0):
        raise PeftExportError(f"--rank must be a positive integer for {method.name}, got {config.rank}")
    config.targets = parse_targets(config.targets)  # encoder targets (LoRA's) and dec.* (every method that fits)
    check_decoder_config(config)
    if method.name == "adaptformer" and config.bottleneck <= 0:
        raise PeftExportError(f"--bottleneck must be positive, got {config.bottleneck}")
    if config.adaptformer_scale != "learnable":
        try:
            float(config.adaptformer_scale)
        except (TypeError, ValueError):
            raise PeftExportError(
                f"AdaptFormer scale must be 'learnable' or a number, got {config.adaptformer_scale!r}"
            ) from None
    if not 0.0 <= config.dropout < 1.0:
        raise PeftExportError(f"--dropout must be in [0, 1), got {config.dropout}")
    return resolve_blocks(config.blocks, depth, late_start)


def late_blocks_start(trunk: torch.nn.Module) -> int | None:
    """Hiera (SAM 2): ``late`` is the last whole stages that hold at least half of the blocks (stages 3
    and 4 in every SAM 2.1 config: blocks 3-11 of hiera_t); None for SAM's plain ViT (the last half)."""
    stage_ends = getattr(trunk, "stage_ends", None)
    if not stage_ends:
        return None
    depth = len(trunk.blocks)
    starts = [0] + [e + 1 for e in stage_ends[:-1]]
    return max(s for s in starts if depth - s >= depth - depth // 2)


def apply_peft(sam: Sam, config: PeftConfig) -> Sam:
    """Install the PEFT method in place and set which tensors train; returns ``sam``.

    Only the image path trains: SAM 2's memory modules stay frozen (and out of adapter files)."""
    trunk = encoder_trunk(sam)
    blocks = check_config(config, len(trunk.blocks), late_blocks_start(trunk))
    method = get_method(config.method)
    parts = model_parts(sam)
    for p in sam.parameters():
        p.requires_grad_(False)
    method.apply(sam, config, blocks)
    # New adapter layers are created trainable; base tensors inside them stay frozen.
    for module in sam.image_encoder.modules():
        if isinstance(module, (MergeableLayer, AdaptFormerMLP)):
            for name, p in module.named_parameters(recurse=False):
                p.requires_grad_(True)
            for child_name, child in module.named_children():
                if child_name not in ("qkv_proj", "mlp_layer", "layer", "mlp_proj"):
                    for p in child.parameters():
                        p.requires_grad_(True)
    for p in parts["prompt_encoder"].parameters():
        p.requires_grad_(config.train_prompt_encoder)
    for p in parts["mask_decoder"].parameters():
        p.requires_grad_(config.train_mask_decoder)
    apply_decoder_peft(sam, config)  # dec.* targets: the decoder's own weights freeze, its adapter layers train
    sam.peft_config = config  # type: ignore[attr-defined]
    return sam


def has_unmergeable_layers(sam: Sam) -> bool:
    """Whether an AdaptFormer branch (encoder or decoder) is installed: it stays in exported graphs."""
    return any(isinstance(m, AdaptFormerMLP) for m in sam.modules())


def merge_peft(sam: Sam, keep_unmergeable: bool = False) -> Sam:
    """A copy of ``sam`` with every PEFT layer folded into plain SAM modules.

    The result has exactly segment_anything's module structure and state-dict keys; every
    module keeps its device and dtype (a QLoRA model's 4-bit layers become plain Linears in
    the dtype they were quantised from).
    Raises for AdaptFormer, whose ReLU branch cannot be folded into any weight, unless
    ``keep_unmergeable``: then everything else is folded and the AdaptFormer branches stay (export:
    the decoder graphs read the projections' weights, which a LoRA layer beside an AdaptFormer
    branch must have folded in).
    """
    if has_unmergeable_layers(sam) and not keep_unmergeable:
        raise PeftExportError(
            "adaptformer cannot be merged: its branch up(ReLU(down(x))) is non-linear in x, so no base "
            "weight can absorb it; use merge-and-export, which keeps the branch inside the graph"
        )
    merged = copy.deepcopy(sam).eval()
    # Deepest first, so a wrapper's children are plain before the wrapper folds.
    names = [n for n, m in merged.named_modules() if isinstance(m, MergeableLayer)]
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):
        layer = merged.get_submodule(name)
        replace_module(merged, name, layer.merged())
    dequantize_4bit_linears(merged)  # QLoRA: the layers LoRA did not wrap are 4-bit too
    for p in merged.parameters():
        p.requires_grad_(False)
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged


def count_trainable_parameters(sam: Sam) -> dict[str, int]:
    """Trainable parameters split by image encoder / prompt encoder / mask decoder."""
    counts = {part: sum(p.numel() for p in module.parameters() if p.requires_grad)
              for part, module in model_parts(sam).items()}
    counts["total"] = sum(counts.values())
    return counts


def trainable_state(sam: Sam) -> dict[str, torch.Tensor]:
    """The tensors that training changes: what an adapter file stores."""
    return {n: p.detach().cpu().contiguous() for n, p in sam.named_parameters() if p.requires_grad}
