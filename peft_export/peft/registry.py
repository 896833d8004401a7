"""One registry of every PEFT method of the paper: how to apply it and whether it merges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from segment_anything.modeling import Sam

from ..errors import PeftExportError
from ..models.family import encoder_trunk
from .adaptformer import apply_adaptformer
from .config import PeftConfig
from .fact import apply_fact
from .lora import apply_lora
from .qlora import qlora_device, quantize_encoder_linears
from .selective import unfreeze_block
from .ssf import apply_ssf, apply_ssf_patch_embed


@dataclass(frozen=True)
class PeftMethod:
    name: str
    description: str
    mergeable: bool
    # Installs the method on the chosen encoder blocks (of ``encoder_trunk``: SAM's image encoder,
    # SAM 2's Hiera); parameters it creates or unfreezes end up with requires_grad=True, everything
    # else in the encoder frozen.
    apply: Callable[[Sam, PeftConfig, list[int]], None]


def _lora(sam: Sam, cfg: PeftConfig, blocks: list[int]) -> None:
    for i in blocks:
        apply_lora(encoder_trunk(sam).blocks[i], cfg.rank, cfg.targets, cfg.alpha)


def _qlora(sam: Sam, cfg: PeftConfig, blocks: list[int]) -> None:
    device = qlora_device()
    quantize_encoder_linears(sam.image_encoder, device)
    _lora(sam, cfg, blocks)
    sam.to(device)  # one device for the whole model: the 4-bit layers cannot leave theirs unquantised


def _fact(sam: Sam, cfg: PeftConfig, blocks: list[int]) -> None:
    for i in blocks:
        apply_fact(encoder_trunk(sam).blocks[i], cfg.rank, cfg.dropout)


def _ssf(sam: Sam, cfg: PeftConfig, blocks: list[int]) -> None:
    if cfg.ssf_patch_embed and blocks:  # --blocks none: no encoder SSF at all (decoder-only targets)
        apply_ssf_patch_embed(encoder_trunk(sam).patch_embed)
    for i in blocks:
        apply_ssf(encoder_trunk(sam).blocks[i])


def _adaptformer(sam: Sam, cfg: PeftConfig, blocks: list[int]) -> None:
    for i in blocks:
        apply_adaptformer(encoder_trunk(sam).blocks[i], cfg.bottleneck, cfg.adaptformer_scale, cfg.adaptformer_residual)


def _selective(method: str) -> Callable[[Sam, PeftConfig, list[int]], None]:
    def apply(sam: Sam, cfg: PeftConfig, blocks: list[int]) -> None:
        for i in blocks:
            unfreeze_block(encoder_trunk(sam).blocks[i], method)

    return apply


def _full(sam: Sam, cfg: PeftConfig, blocks: list[int]) -> None:
    # Full finetuning of every block means the whole encoder, as in the paper (89.67M for
    # vit_b): patch embedding, pos_embed and neck too. "Late ft" unfreezes only its blocks.
    if len(blocks) == len(encoder_trunk(sam).blocks):
        for name, p in sam.image_encoder.named_parameters():
            # TinyViT's classifier (norm_head, head) is kept for checkpoints but never runs in SAM.
            p.requires_grad_(not name.startswith(("norm_head.", "head.")))
    else:
        _selective("full")(sam, cfg, blocks)


def _nothing(sam: Sam, cfg: PeftConfig, blocks: list[int]) -> None:
    return None


PEFT_METHODS: dict[str, PeftMethod] = {
    m.name: m
    for m in (
        PeftMethod("lora", "low-rank update of q/k/v (and MLP) weights", True, _lora),
        PeftMethod("qlora", "LoRA on a 4-bit NF4 encoder (bitsandbytes; CUDA, or CPU where bitsandbytes has 4-bit CPU kernels)", True, _qlora),
        PeftMethod("fact", "factor-tuning: shared U, V and per-projection S on q and v", True, _fact),
        PeftMethod("ssf", "per-channel scale and shift after qkv, proj, MLP, norms, patch embedding", True, _ssf),
        PeftMethod("adaptformer", "parallel bottleneck MLP branch (ReLU): kept in the graph, not merged", False, _adaptformer),
        PeftMethod("attention", "attention tuning: unfreeze attn.* of the chosen blocks", True, _selective("attention")),
        PeftMethod("bias", "bias tuning: unfreeze every bias of the chosen blocks", True, _selective("bias")),
        PeftMethod("layernorm", "LayerNorm tuning: unfreeze norm1/norm2 of the chosen blocks", True, _selective("layernorm")),
        PeftMethod("full", "full finetuning: whole encoder, or only the chosen blocks ('late ft')", True, _full),
        PeftMethod("freeze-encoder", "encoder frozen; only prompt encoder and mask decoder train", True, _nothing),
    )
}


def get_method(name: str) -> PeftMethod:
    if name not in PEFT_METHODS:
        raise PeftExportError(f"unknown PEFT method {name!r}; choose one of {', '.join(PEFT_METHODS)}")
    return PEFT_METHODS[name]
