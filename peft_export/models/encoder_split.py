"""Where SAM's image encoder splits: the first block anything trains in, the frozen trunk before it, the tail after.

Training runs the trunk without autograd; export puts the trunk of several adapters into one
graph (``trunk.onnx``) and each adapter's tail into its own. Every function here takes
anything with an ``image_encoder`` attribute (a ``Sam``, or a wrapper holding a converted copy).

Both encoders split the same way: a stem (ViT: patch embedding + ``pos_embed``; TinyViT:
patch embedding + the MBConv stage), ``blocks``, then the neck. TinyViT's downsamples
between stages count with the block before them, and its trunk output is that block's
(NHWC, like ViT's).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from segment_anything.modeling import Sam

from .tiny_vit import channels_first


def _is_tiny_vit(enc: torch.nn.Module) -> bool:
    return hasattr(enc, "run_blocks")


def _stem_parameters(enc: torch.nn.Module) -> list[torch.nn.Parameter]:
    if _is_tiny_vit(enc):
        return [p for m in enc.stem_modules() for p in m.parameters()]
    return list(enc.patch_embed.parameters()) + ([enc.pos_embed] if enc.pos_embed is not None else [])


def _stem(enc: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _is_tiny_vit(enc):
        return enc.stem(x)
    h = enc.patch_embed(x)
    return h + enc.pos_embed if enc.pos_embed is not None else h


def _block_segments(enc: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """Each block with what runs right after it before the next block (TinyViT's downsamples)."""
    if _is_tiny_vit(enc):
        return [[b] + ([d] if d is not None else []) for b, d in zip(enc.blocks, enc.block_downsamples())]
    return [[b] for b in enc.blocks]


def _run_blocks(enc: torch.nn.Module, h: torch.Tensor, start: int, stop: int | None = None, run=None) -> torch.Tensor:
    if _is_tiny_vit(enc):
        return enc.run_blocks(h, start, stop, run)
    for blk in enc.blocks[start:stop]:
        h = run(blk, h) if run is not None else blk(h)
    return h


def first_trainable_block(sam: Sam) -> int | None:
    """Index of the first encoder block with a trainable tensor (depth if none).

    None when the stem (patch embedding or positional embedding) trains: then nothing of
    the encoder can run without autograd.
    """
    enc = sam.image_encoder
    if any(p.requires_grad for p in _stem_parameters(enc)):
        return None
    for i, segment in enumerate(_block_segments(enc)):
        if any(p.requires_grad for m in segment for p in m.parameters()):
            return i
    return len(enc.blocks)


def frozen_trunk(sam: Sam, x: torch.Tensor, first_trainable: int) -> torch.Tensor:
    """stem + blocks[:first_trainable] without autograd (B x h x w x C)."""
    enc = sam.image_encoder
    with torch.no_grad():
        return _run_blocks(enc, _stem(enc, x), 0, first_trainable)


def _checkpointed(blk: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=False)


def trainable_tail(sam: Sam, h: torch.Tensor, first_trainable: int, grad_checkpointing: bool = False) -> torch.Tensor:
    """blocks[first_trainable:] and the neck, with autograd (checkpointed per block if asked)."""
    enc = sam.image_encoder
    run = _checkpointed if grad_checkpointing and torch.is_grad_enabled() else None
    h = _run_blocks(enc, h, first_trainable, None, run)
    neck_trains = any(p.requires_grad for p in enc.neck.parameters())
    if first_trainable >= len(enc.blocks) and not neck_trains:
        with torch.no_grad():
            return enc.neck(channels_first(h))
    return enc.neck(channels_first(h))


def encode_with_frozen_prefix(sam: Sam, x: torch.Tensor, first_trainable: int | None,
                              grad_checkpointing: bool = False) -> torch.Tensor:
    """Same output as ``sam.image_encoder(x)``, but the frozen prefix builds no autograd graph."""
    if first_trainable is None:
        return trainable_tail(sam, _stem(sam.image_encoder, x), 0, grad_checkpointing)
    return trainable_tail(sam, frozen_trunk(sam, x, first_trainable), first_trainable, grad_checkpointing)


def block_of_key(enc: torch.nn.Module, key: str) -> int | None:
    """Which block an image-encoder state key (without ``image_encoder.``) runs with: -1 for the stem,
    the block index, or None for what runs after every block (neck; TinyViT's unused classifier)."""
    parts = key.split(".")
    if _is_tiny_vit(enc):
        if parts[0] == "patch_embed" or parts[:2] == ["layers", "0"]:
            return -1
        if parts[0] != "layers":
            return None
        stage = int(parts[1])
        offset = sum(len(enc.layers[s].blocks) for s in range(1, stage))
        if parts[2] == "downsample":  # runs with the stage's last block
            return offset + len(enc.layers[stage].blocks) - 1
        return offset + int(parts[3])
    if parts[0] in ("patch_embed", "pos_embed"):
        return -1
    return int(parts[1]) if parts[0] == "blocks" else None


def is_trunk_key(enc: torch.nn.Module, key: str, split: int) -> bool:
    """Whether an image-encoder state key (without ``image_encoder.``) belongs to the stem + blocks[:split]."""
    block = block_of_key(enc, key)
    return block is not None and block < split


def trunk_features_shape(enc: torch.nn.Module, split: int) -> list[int]:
    """(1, h, w, C) of ``frozen_trunk``'s output at ``split``, for the image size the encoder was built at.

    ViT: always the patch grid and width. TinyViT: the grid and width of the stage the split is in
    (its downsamples change both).
    """
    if not _is_tiny_vit(enc):
        proj = enc.patch_embed.proj
        g = enc.img_size // int(proj.kernel_size[0])
        return [1, g, g, int(proj.out_channels)]

    def down(size: int, merging: torch.nn.Module) -> int:
        stride = int(merging.conv2.c.stride[0])
        return -(-size // stride)

    first = enc.layers[0].downsample
    size, channels = down(enc.img_size // 4, first), int(first.conv3.c.out_channels)
    for merging in enc.block_downsamples()[:split]:
        if merging is not None:
            size, channels = down(size, merging), int(merging.conv3.c.out_channels)
    return [1, size, size, channels]
