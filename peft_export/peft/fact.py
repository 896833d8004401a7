"""FacT (factor-tuning) on SAM's qkv, as micro-sam's ``FacTSurgery``, with exact merge.

q += V · drop(S_q · U · x), v += V · drop(S_v · U · x), one U, V, S_q, S_v per block,
scale 1. Dropout is identity in eval mode, so the merged weight is
``W_q + V S_q U`` (and the same for v). On TinyViT (vit_t) q and v are the per-head
channels of its qkv output (``lora.qkv_heads``).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MergeableLayer, fp64, linear_dtype, linear_weight_fp64, plain_linear
from .lora import interleave_qkv, qkv_heads, qkv_rows


class FacTQKV(MergeableLayer):
    def __init__(self, qkv: nn.Module, rank: int, dropout: float | None = 0.1, groups: int = 1):
        super().__init__()
        self.qkv_proj = qkv
        self.groups = groups
        self.in_dim = qkv.in_features
        self.out_dim = qkv.out_features // 3
        self.q_FacTs = nn.Linear(rank, rank, bias=False)
        self.v_FacTs = nn.Linear(rank, rank, bias=False)
        self.FacTu = nn.Linear(self.in_dim, rank, bias=False)
        self.FacTv = nn.Linear(rank, self.out_dim, bias=False)
        nn.init.zeros_(self.FacTv.weight)  # start equal to the base model
        self.dp_q = nn.Dropout(dropout or 0.0)
        self.dp_v = nn.Dropout(dropout or 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        u = self.FacTu(x)
        new_q = self.FacTv(self.dp_q(self.q_FacTs(u)))
        new_v = self.FacTv(self.dp_v(self.v_FacTs(u)))
        d = self.out_dim
        if self.groups > 1:
            return qkv + interleave_qkv([new_q, torch.zeros_like(new_q), new_v], self.groups)
        return torch.cat([qkv[..., :d] + new_q, qkv[..., d : 2 * d], qkv[..., 2 * d :] + new_v], dim=-1)

    def merged(self) -> nn.Linear:
        weight, bias = linear_weight_fp64(self.qkv_proj)
        dev = weight.device
        u, v = fp64(self.FacTu.weight, dev), fp64(self.FacTv.weight, dev)
        g = self.groups
        qkv_rows(weight, g, 0).add_((v @ fp64(self.q_FacTs.weight, dev) @ u).view(g, -1, self.in_dim))
        qkv_rows(weight, g, 2).add_((v @ fp64(self.v_FacTs.weight, dev) @ u).view(g, -1, self.in_dim))
        return plain_linear(weight, bias, linear_dtype(self.qkv_proj))


def apply_fact(block: nn.Module, rank: int, dropout: float) -> None:
    block.attn.qkv = FacTQKV(block.attn.qkv, rank, dropout, groups=qkv_heads(block.attn))
