"""What every PEFT layer shares: a layer that can fold itself into plain modules.

Folds are computed in float64 on the layer's own device and written back in the layer's
own dtype, so a bf16 or fp16 model on a GPU merges into a bf16 or fp16 model on that GPU.
"""

from __future__ import annotations

import torch
from torch import nn


class MergeableLayer(nn.Module):
    """A PEFT wrapper that knows how to fold itself into the plain module it wraps.

    ``merged()`` returns a plain module whose output equals this layer's output in eval
    mode, on the wrapped layer's device and in its dtype; deltas are computed in float64.
    """

    def merged(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError


def is_4bit(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit Linear (QLoRA's base), recognised without importing bitsandbytes."""
    return type(getattr(layer, "weight", None)).__name__ == "Params4bit"


def linear_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a Linear computes in; for a 4-bit layer the dtype its weight was quantised from."""
    if is_4bit(layer):
        return layer.weight.quant_state.dtype
    return layer.weight.dtype


def linear_weight_fp64(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of a Linear (or a 4-bit bitsandbytes Linear, dequantised) in float64, on its device."""
    weight = layer.weight
    if is_4bit(layer):  # QLoRA base: dequantise before merging
        import bitsandbytes.functional as bnbf

        if weight.quant_state is None:
            raise ValueError("a 4-bit layer that was never quantised (bitsandbytes quantises on .to(device))")
        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    bias = layer.bias.detach().double() if layer.bias is not None else None
    return weight.detach().double(), bias


def fp64(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A trained tensor in float64 on ``device``: where and how folds are computed."""
    return t.detach().to(device=device, dtype=torch.float64)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear on ``weight``'s device in ``dtype``, holding ``weight``/``bias`` (rounded once from float64)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def dequantized_linear(layer: nn.Module) -> nn.Linear:
    """A 4-bit Linear as a plain nn.Linear of its dequantised weight (in the dtype it was quantised from)."""
    weight, bias = linear_weight_fp64(layer)
    return plain_linear(weight, bias, linear_dtype(layer))


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
