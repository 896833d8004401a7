"""SSF (scale and shift features): y = layer(x) · s + t, folded exactly into the layer.

Wraps qkv, proj, lin1, lin2, norm1, norm2 of the chosen blocks and the patch
embedding conv, with micro-sam's key layout (``*.layer.*``, ``*.scale``, ``*.shift``).
On TinyViT (vit_t): qkv, proj, fc1, fc2, the attention's and the MLP's own LayerNorms, the
depthwise ``local_conv``, and the patch embedding's last conv; a conv with BatchNorm folds
into the BatchNorm's weight and bias. On SAM 2's Hiera: qkv, proj, the MLP's ``layers.0``/``layers.1``,
norm1, norm2, the skip projection ``proj`` of a stage's first block, and the patch embedding conv.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MergeableLayer, fp64, linear_dtype, linear_weight_fp64, plain_linear, replace_module
from .lora import mlp_linears


class ScaleShift(MergeableLayer):
    """Per-channel scale and shift of a Linear / LayerNorm output (last dim) or a Conv2d output (dim 1)."""

    def __init__(self, layer: nn.Module, dim: int):
        super().__init__()
        self.layer = layer
        # SSF paper init: close to identity, so the adapted model starts near the base.
        self.scale = nn.Parameter(1.0 + 0.02 * torch.randn(dim))
        self.shift = nn.Parameter(0.02 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if isinstance(self.layer, nn.Conv2d) or hasattr(self.layer, "bn"):
            return y * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return y * self.scale + self.shift

    def merged(self) -> nn.Module:
        layer = self.layer
        if hasattr(layer, "bn"):  # TinyViT's conv + BatchNorm: scale and shift the BatchNorm's affine
            bn = layer.bn
            s, t = fp64(self.scale, bn.weight.device), fp64(self.shift, bn.weight.device)
            with torch.no_grad():
                bn.bias.copy_(fp64(bn.bias, bn.weight.device) * s + t)
                bn.weight.copy_(fp64(bn.weight, bn.weight.device) * s)
            return layer
        dev = layer.weight.device
        s, t = fp64(self.scale, dev), fp64(self.shift, dev)
        if isinstance(layer, nn.Linear):
            weight, bias = linear_weight_fp64(layer)
            new_bias = (bias * s if bias is not None else 0.0) + t
            return plain_linear(weight * s[:, None], new_bias, linear_dtype(layer))
        # LayerNorm and Conv2d are folded in place: copy_ rounds the float64 fold once to the layer's dtype.
        with torch.no_grad():
            if isinstance(layer, nn.LayerNorm):
                layer.weight.copy_(fp64(layer.weight, dev) * s)
                layer.bias.copy_(fp64(layer.bias, dev) * s + t)
            elif isinstance(layer, nn.Conv2d):
                if layer.bias is None:
                    raise ValueError("SSF on a Conv2d without bias cannot be folded")
                layer.weight.copy_(fp64(layer.weight, dev) * s.view(-1, 1, 1, 1))
                layer.bias.copy_(fp64(layer.bias, dev) * s + t)
            else:  # pragma: no cover - apply_ssf only wraps the three kinds above
                raise TypeError(f"cannot fold SSF into {type(layer).__name__}")
        return layer


def apply_ssf(block: nn.Module) -> None:
    if hasattr(block, "local_conv"):  # TinyViT
        _apply_ssf_tiny_vit(block)
        return
    block.attn.qkv = ScaleShift(block.attn.qkv, block.attn.qkv.out_features)
    block.attn.proj = ScaleShift(block.attn.proj, block.attn.proj.out_features)
    for name in mlp_linears(block.mlp):
        layer = block.mlp.get_submodule(name)
        replace_module(block.mlp, name, ScaleShift(layer, layer.out_features))
    if isinstance(getattr(block, "proj", None), nn.Linear):  # Hiera: skip projection where the width changes
        block.proj = ScaleShift(block.proj, block.proj.out_features)
    block.norm1 = ScaleShift(block.norm1, block.norm1.normalized_shape[0])
    block.norm2 = ScaleShift(block.norm2, block.norm2.normalized_shape[0])


def _apply_ssf_tiny_vit(block: nn.Module) -> None:
    attn, mlp = block.attn, block.mlp
    for parent, name in ((attn, "qkv"), (attn, "proj"), (mlp, "fc1"), (mlp, "fc2")):
        setattr(parent, name, ScaleShift(getattr(parent, name), getattr(parent, name).out_features))
    attn.norm = ScaleShift(attn.norm, attn.norm.normalized_shape[0])
    mlp.norm = ScaleShift(mlp.norm, mlp.norm.normalized_shape[0])
    block.local_conv = ScaleShift(block.local_conv, block.local_conv.bn.num_features)


def apply_ssf_patch_embed(patch_embed: nn.Module) -> None:
    if hasattr(patch_embed, "seq"):  # TinyViT: after the last conv + BatchNorm
        patch_embed.seq[2] = ScaleShift(patch_embed.seq[2], patch_embed.seq[2].bn.num_features)
        return
    patch_embed.proj = ScaleShift(patch_embed.proj, patch_embed.proj.out_channels)


def apply_ssf_decoder(decoder: nn.Module, targets: tuple[str, ...]) -> None:
    """SSF after every mask-decoder Linear the ``dec.*`` targets select (``decoder_targets``)."""
    from .base import replace_module
    from .decoder_targets import target_linears

    for target in targets:
        for name, linear in target_linears(decoder, target):
            replace_module(decoder, name, ScaleShift(linear, linear.out_features))
