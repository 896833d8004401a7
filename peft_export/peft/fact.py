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


class _FacTProjection(nn.Module):
    """A q/k/v projection of a decoder attention with its FacT update, ``linear(x) + owner.delta(which, x)``.

    The owning ``FacTAttention`` holds the shared U and V; it is referenced, not registered, so the
    module tree (and the state dict) has no cycle.
    """

    def __init__(self, linear: nn.Linear, owner: "FacTAttention", which: str):
        super().__init__()
        self.linear = linear
        self.which = which
        object.__setattr__(self, "_owner", owner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self._owner.delta(self.which, x)


class FacTAttention(MergeableLayer):
    """FacT on one attention of the mask decoder: ``p += V · drop(S_p · U · x_p)`` for each chosen
    projection p of q, k, v, with U and V shared by them (as micro-sam's FacT shares them by q and v
    of an encoder block). The attention runs as it is; its projections carry the updates."""

    def __init__(self, attn: nn.Module, rank: int, dropout: float | None = 0.1, which: tuple[str, ...] = ("q", "v")):
        super().__init__()
        projections = [getattr(attn, f"{p}_proj") for p in which]
        shapes = {(p.in_features, p.out_features) for p in projections}
        if len(shapes) != 1:
            raise ValueError(f"FacT shares U and V: projections {which} must have one shape, got {sorted(shapes)}")
        (in_dim, out_dim), = shapes
        self.attn = attn
        self.which = tuple(which)
        self.FacTu = nn.Linear(in_dim, rank, bias=False)
        self.FacTv = nn.Linear(rank, out_dim, bias=False)
        nn.init.zeros_(self.FacTv.weight)  # start equal to the base model
        self.dp = nn.Dropout(dropout or 0.0)
        for p, linear in zip(which, projections):
            setattr(self, f"{p}_FacTs", nn.Linear(rank, rank, bias=False))
            setattr(attn, f"{p}_proj", _FacTProjection(linear, self, p))

    def delta(self, which: str, x: torch.Tensor) -> torch.Tensor:
        return self.FacTv(self.dp(getattr(self, f"{which}_FacTs")(self.FacTu(x))))

    def forward(self, *args, **kwargs):
        return self.attn(*args, **kwargs)

    def merged(self) -> nn.Module:
        for p in self.which:
            linear = getattr(self.attn, f"{p}_proj").linear
            weight, bias = linear_weight_fp64(linear)
            dev = weight.device
            weight += fp64(self.FacTv.weight, dev) @ fp64(getattr(self, f"{p}_FacTs").weight, dev) @ fp64(self.FacTu.weight, dev)
            setattr(self.attn, f"{p}_proj", plain_linear(weight, bias, linear_dtype(linear)))
        return self.attn


def apply_fact_decoder(decoder: nn.Module, rank: int, dropout: float, targets: tuple[str, ...]) -> None:
    """FacT on every mask-decoder attention a ``dec.*`` target names, on its chosen q, k, v projections."""
    from .base import replace_module
    from .decoder_targets import target_attentions

    for name, chosen in target_attentions(decoder, targets):
        replace_module(decoder, name, FacTAttention(decoder.get_submodule(name), rank, dropout, chosen))
