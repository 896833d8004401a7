"""What every PEFT layer shares: a layer that can fold itself into plain modules."""

from __future__ import annotations

import torch
from torch import nn


class MergeableLayer(nn.Module):
    """A PEFT wrapper that knows how to fold itself into the plain module it wraps.

    ``merged()`` returns a new plain module whose output equals this layer's output in
    eval mode; deltas are computed in float64 from the fp32 weights.
    """

    def merged(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def linear_weight_fp64(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of a Linear (or a 4-bit bitsandbytes Linear, dequantised) in float64."""
    weight = layer.weight
    if weight.__class__.__name__ == "Params4bit":  # QLoRA base: dequantise before merging
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    bias = layer.bias.detach().double().cpu() if layer.bias is not None else None
    return weight.detach().double().cpu(), bias


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
