"""LoRA on SAM's fused qkv projection and on the MLP, with exact merge.

Module and parameter names follow micro-sam's ``peft_sam.py`` so that its training
checkpoints load without renaming: ``attn.qkv.qkv_proj.*``,
``attn.qkv.w_{a,b}_linear_{q,k,v}.weight``, ``mlp.mlp_layer.lin{1,2}.*``,
``mlp.w_{a,b}_linear_{1,2}.weight``. As there, the update is ``alpha * B @ A``
(alpha defaults to 1, no division by the rank).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import MergeableLayer, fp64, linear_dtype, linear_weight_fp64, plain_linear


def _low_rank_pair(in_features: int, out_features: int, rank: int) -> tuple[nn.Linear, nn.Linear]:
    a = nn.Linear(in_features, rank, bias=False)
    b = nn.Linear(rank, out_features, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)  # the adapted model starts equal to the base
    return a, b


class QKVLoRA(MergeableLayer):
    """``qkv(x)`` with ``alpha * B_t A_t x`` added to the q, k and/or v slices."""

    def __init__(self, qkv: nn.Module, rank: int, targets: tuple[str, ...], alpha: float = 1.0):
        super().__init__()
        self.qkv_proj = qkv
        self.in_dim = qkv.in_features
        self.out_dim = qkv.out_features // 3
        self.rank = rank
        self.alpha = alpha
        self.targets = tuple(t for t in ("q", "k", "v") if t in targets)
        for t in self.targets:
            a, b = _low_rank_pair(self.in_dim, self.out_dim, rank)
            setattr(self, f"w_a_linear_{t}", a)
            setattr(self, f"w_b_linear_{t}", b)

    def _delta(self, t: str, x: torch.Tensor) -> torch.Tensor | float:
        if t not in self.targets:
            return 0.0
        return self.alpha * getattr(self, f"w_b_linear_{t}")(getattr(self, f"w_a_linear_{t}")(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        d = self.out_dim
        return torch.cat(
            [
                qkv[..., :d] + self._delta("q", x),
                qkv[..., d : 2 * d] + self._delta("k", x),
                qkv[..., 2 * d :] + self._delta("v", x),
            ],
            dim=-1,
        )

    def merged(self) -> nn.Linear:
        weight, bias = linear_weight_fp64(self.qkv_proj)
        d = self.out_dim
        for i, t in enumerate(("q", "k", "v")):
            if t in self.targets:
                a = fp64(getattr(self, f"w_a_linear_{t}").weight, weight.device)
                b = fp64(getattr(self, f"w_b_linear_{t}").weight, weight.device)
                weight[i * d : (i + 1) * d] += self.alpha * (b @ a)
        return plain_linear(weight, bias, linear_dtype(self.qkv_proj))


class MLPLoRA(MergeableLayer):
    """SAM's MLPBlock with LoRA on both linear layers: lin2(act(lin1 x + B1A1 x)) + B2A2(.)."""

    def __init__(self, mlp: nn.Module, rank: int, alpha: float = 1.0):
        super().__init__()
        self.mlp_layer = mlp
        self.rank = rank
        self.alpha = alpha
        self.w_a_linear_1, self.w_b_linear_1 = _low_rank_pair(mlp.lin1.in_features, mlp.lin1.out_features, rank)
        self.w_a_linear_2, self.w_b_linear_2 = _low_rank_pair(mlp.lin2.in_features, mlp.lin2.out_features, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp_layer
        x = mlp.lin1(x) + self.alpha * self.w_b_linear_1(self.w_a_linear_1(x))
        x = mlp.act(x)
        return mlp.lin2(x) + self.alpha * self.w_b_linear_2(self.w_a_linear_2(x))

    def merged(self) -> nn.Module:
        mlp = self.mlp_layer
        for name, a, b in (("lin1", self.w_a_linear_1, self.w_b_linear_1), ("lin2", self.w_a_linear_2, self.w_b_linear_2)):
            layer = getattr(mlp, name)
            weight, bias = linear_weight_fp64(layer)
            weight += self.alpha * (fp64(b.weight, weight.device) @ fp64(a.weight, weight.device))
            setattr(mlp, name, plain_linear(weight, bias, linear_dtype(layer)))
        return mlp


def apply_lora(block: nn.Module, rank: int, targets: tuple[str, ...], alpha: float) -> None:
    """Wrap one encoder block's qkv (and MLP when ``mlp`` is a target) with LoRA."""
    attn_targets = tuple(t for t in targets if t in ("q", "k", "v"))
    if attn_targets:
        block.attn.qkv = QKVLoRA(block.attn.qkv, rank, attn_targets, alpha)
    if "mlp" in targets:
        block.mlp = MLPLoRA(block.mlp, rank, alpha)
