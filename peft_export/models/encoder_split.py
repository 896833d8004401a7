"""Where SAM's image encoder splits: the first block anything trains in, the frozen trunk before it, the tail after.

Training runs the trunk without autograd; export puts the trunk of several adapters into one
graph (``trunk.onnx``) and each adapter's tail into its own. Every function here takes
anything with an ``image_encoder`` attribute (a ``Sam``, or a wrapper holding a converted copy).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from segment_anything.modeling import Sam


def first_trainable_block(sam: Sam) -> int | None:
    """Index of the first encoder block with a trainable tensor (depth if none).

    None when the stem (patch embedding or positional embedding) trains: then nothing of
    the encoder can run without autograd.
    """
    enc = sam.image_encoder
    stem = list(enc.patch_embed.parameters()) + ([enc.pos_embed] if enc.pos_embed is not None else [])
    if any(p.requires_grad for p in stem):
        return None
    for i, blk in enumerate(enc.blocks):
        if any(p.requires_grad for p in blk.parameters()):
            return i
    return len(enc.blocks)


def frozen_trunk(sam: Sam, x: torch.Tensor, first_trainable: int) -> torch.Tensor:
    """patch_embed + pos_embed + blocks[:first_trainable] without autograd (B x g x g x C)."""
    enc = sam.image_encoder
    with torch.no_grad():
        h = enc.patch_embed(x)
        if enc.pos_embed is not None:
            h = h + enc.pos_embed
        for blk in enc.blocks[:first_trainable]:
            h = blk(h)
    return h


def trainable_tail(sam: Sam, h: torch.Tensor, first_trainable: int, grad_checkpointing: bool = False) -> torch.Tensor:
    """blocks[first_trainable:] and the neck, with autograd (checkpointed per block if asked)."""
    enc = sam.image_encoder
    for blk in enc.blocks[first_trainable:]:
        if grad_checkpointing and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=False)
        else:
            h = blk(h)
    neck_trains = any(p.requires_grad for p in enc.neck.parameters())
    if first_trainable >= len(enc.blocks) and not neck_trains:
        with torch.no_grad():
            return enc.neck(h.permute(0, 3, 1, 2))
    return enc.neck(h.permute(0, 3, 1, 2))


def encode_with_frozen_prefix(sam: Sam, x: torch.Tensor, first_trainable: int | None,
                              grad_checkpointing: bool = False) -> torch.Tensor:
    """Same output as ``sam.image_encoder(x)``, but the frozen prefix builds no autograd graph."""
    if first_trainable is None:
        enc = sam.image_encoder
        h = enc.patch_embed(x)
        if enc.pos_embed is not None:
            h = h + enc.pos_embed
        return trainable_tail(sam, h, 0, grad_checkpointing)
    return trainable_tail(sam, frozen_trunk(sam, x, first_trainable), first_trainable, grad_checkpointing)
