"""LoRA on SAM's fused qkv projection and on the MLP, with exact merge.

Module and parameter names follow micro-sam's ``peft_sam.py`` so that its training
checkpoints load without renaming: ``attn.qkv.qkv_proj.*``,
``attn.qkv.w_{a,b}_linear_{q,k,v}.weight``, ``mlp.mlp_layer.lin{1,2}.*``,
``mlp.w_{a,b}_linear_{1,2}.weight``. As there, the update is ``alpha * B @ A``
(alpha defaults to 1, no division by the rank).

SAM's ``qkv`` output is [q | k | v]; TinyViT's (vit_t) is per head, [q_h, k_h, v_h] for
each head h (``qkv_heads(attn)``): the q, k and v updates go to those channels. SAM 2's Hiera
blocks are SAM's layout ([q | k | v]; in a stage's first block qkv maps dim to 3 x dim_out),
their MLP is sam2's ``MLP`` with ``layers.0`` / ``layers.1``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import MergeableLayer, fp64, linear_dtype, linear_weight_fp64, plain_linear, replace_module


def _low_rank_pair(in_features: int, out_features: int, rank: int) -> tuple[nn.Linear, nn.Linear]:
    a = nn.Linear(in_features, rank, bias=False)
    b = nn.Linear(rank, out_features, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)  # the adapted model starts equal to the base
    return a, b


def qkv_heads(attn: nn.Module) -> int:
    """How many [q_h, k_h, v_h] groups ``attn.qkv``'s output has: 1 for SAM's [q | k | v],
    the head count for TinyViT, whose attention splits qkv per head."""
    return attn.num_heads if hasattr(attn, "attention_biases") else 1


def qkv_rows(weight: torch.Tensor, groups: int, which: int) -> torch.Tensor:
    """A view of the q (0), k (1) or v (2) rows of a qkv weight/bias, shaped (groups, rows per group, ...)."""
    return weight.view(groups, 3, weight.shape[0] // (3 * groups), *weight.shape[1:])[:, which]


def interleave_qkv(parts: list[torch.Tensor], groups: int) -> torch.Tensor:
    """q, k, v updates (..., D) laid out like qkv's output: [q | k | v], or per group [q_g, k_g, v_g]."""
    if groups == 1:
        return torch.cat(parts, dim=-1)
    return torch.stack([p.unflatten(-1, (groups, -1)) for p in parts], dim=-2).flatten(-3)


class QKVLoRA(MergeableLayer):
    """``qkv(x)`` with ``alpha * B_t A_t x`` added to the q, k and/or v channels."""

    def __init__(self, qkv: nn.Module, rank: int, targets: tuple[str, ...], alpha: float = 1.0, groups: int = 1):
        super().__init__()
        self.qkv_proj = qkv
        self.in_dim = qkv.in_features
        self.out_dim = qkv.out_features // 3
        self.groups = groups
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
        if self.groups > 1:
            deltas = [self._delta(t, x) for t in ("q", "k", "v")]
            zero = qkv.new_zeros(()).expand(*qkv.shape[:-1], d)
            return qkv + interleave_qkv([zero if isinstance(t, float) else t for t in deltas], self.groups)
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
        for i, t in enumerate(("q", "k", "v")):
            if t in self.targets:
                a = fp64(getattr(self, f"w_a_linear_{t}").weight, weight.device)
                b = fp64(getattr(self, f"w_b_linear_{t}").weight, weight.device)
                qkv_rows(weight, self.groups, i).add_((self.alpha * (b @ a)).view(self.groups, -1, self.in_dim))
        return plain_linear(weight, bias, linear_dtype(self.qkv_proj))


def mlp_linears(mlp: nn.Module) -> tuple[str, str]:
    """Names of an MLP's two Linears: SAM's ``lin1``/``lin2``, TinyViT's ``fc1``/``fc2``, sam2's
    ``layers.0``/``layers.1`` (read them with ``get_submodule``)."""
    if hasattr(mlp, "lin1"):
        return ("lin1", "lin2")
    if hasattr(mlp, "layers"):
        if len(mlp.layers) != 2 or getattr(mlp, "sigmoid_output", False):
            raise ValueError("only two-layer MLPs without output sigmoid (Hiera's) take MLP adapters")
        return ("layers.0", "layers.1")
    return ("fc1", "fc2")


def mlp_input(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What an MLP's first Linear sees: TinyViT's MLP normalises its own input (``mlp.norm``)."""
    norm = getattr(mlp, "norm", None)
    return norm(x) if norm is not None else x


class MLPLoRA(MergeableLayer):
    """The encoder's MLP with LoRA on both linear layers: lin2(act(lin1 x + B1A1 x)) + B2A2(.)."""

    def __init__(self, mlp: nn.Module, rank: int, alpha: float = 1.0):
        super().__init__()
        self.mlp_layer = mlp
        self.rank = rank
        self.alpha = alpha
        first, second = (mlp.get_submodule(n) for n in mlp_linears(mlp))
        self.w_a_linear_1, self.w_b_linear_1 = _low_rank_pair(first.in_features, first.out_features, rank)
        self.w_a_linear_2, self.w_b_linear_2 = _low_rank_pair(second.in_features, second.out_features, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp_layer
        first, second = (mlp.get_submodule(n) for n in mlp_linears(mlp))
        x = mlp_input(mlp, x)
        x = first(x) + self.alpha * self.w_b_linear_1(self.w_a_linear_1(x))
        x = mlp.act(x)
        return second(x) + self.alpha * self.w_b_linear_2(self.w_a_linear_2(x))

    def merged(self) -> nn.Module:
        mlp = self.mlp_layer
        first, second = mlp_linears(mlp)
        for name, a, b in ((first, self.w_a_linear_1, self.w_b_linear_1), (second, self.w_a_linear_2, self.w_b_linear_2)):
            layer = mlp.get_submodule(name)
            weight, bias = linear_weight_fp64(layer)
            weight += self.alpha * (fp64(b.weight, weight.device) @ fp64(a.weight, weight.device))
            replace_module(mlp, name, plain_linear(weight, bias, linear_dtype(layer)))
        return mlp


class LinearLoRA(MergeableLayer):
    """One Linear with a low-rank update: ``linear(x) + alpha * B A x`` (the mask decoder's layers)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float = 1.0):
        super().__init__()
        self.linear = linear
        self.rank = rank
        self.alpha = alpha
        self.w_a_linear, self.w_b_linear = _low_rank_pair(linear.in_features, linear.out_features, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.alpha * self.w_b_linear(self.w_a_linear(x))

    def merged(self) -> nn.Linear:
        weight, bias = linear_weight_fp64(self.linear)
        a, b = fp64(self.w_a_linear.weight, weight.device), fp64(self.w_b_linear.weight, weight.device)
        return plain_linear(weight + self.alpha * (b @ a), bias, linear_dtype(self.linear))


def apply_lora_decoder(decoder: nn.Module, rank: int, targets: tuple[str, ...], alpha: float) -> None:
    """LoRA on every mask-decoder Linear the ``dec.*`` targets select (``decoder_targets``)."""
    from .base import replace_module
    from .decoder_targets import target_linears

    for target in targets:
        for name, linear in target_linears(decoder, target):
            replace_module(decoder, name, LinearLoRA(linear, rank, alpha))


def apply_lora(block: nn.Module, rank: int, targets: tuple[str, ...], alpha: float) -> None:
    """Wrap one encoder block's qkv (and MLP when ``mlp`` is a target) with LoRA."""
    attn_targets = tuple(t for t in targets if t in ("q", "k", "v"))
    if attn_targets:
        block.attn.qkv = QKVLoRA(block.attn.qkv, rank, attn_targets, alpha, groups=qkv_heads(block.attn))
    if "mlp" in targets:
        block.mlp = MLPLoRA(block.mlp, rank, alpha)
