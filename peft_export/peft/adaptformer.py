"""AdaptFormer: a parallel bottleneck branch beside the MLP. Not mergeable.

``mlp(x) + alpha · up(ReLU(down(x)))`` (micro-sam after 1.8), or with the input added
again, ``mlp(x) + x + alpha · up(...)`` (micro-sam up to 1.8: ``residual=True``).
The ReLU makes the branch non-linear in x, so no weight of the base can absorb it:
exports keep it inside the graph. On TinyViT (vit_t) the MLP normalises its own input;
the branch sees that normalised input too, as SAM's branch sees ``norm2(x)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lora import mlp_input


class AdaptFormerMLP(nn.Module):
    def __init__(self, mlp: nn.Module, bottleneck: int = 64, scale: str | float = "learnable", residual: bool = False):
        super().__init__()
        self.mlp_proj = mlp
        dim = next(m for m in mlp.modules() if isinstance(m, nn.Linear)).in_features  # its first Linear's input
        self.down_proj = nn.Linear(dim, bottleneck)
        self.non_linear_func = nn.ReLU()
        self.up_proj = nn.Linear(bottleneck, dim)
        self.residual = residual
        if scale == "learnable":
            self.alpha = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("alpha", torch.tensor([float(scale)]), persistent=False)
        nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp_proj(x)
        x = mlp_input(self.mlp_proj, x)
        out = out + self.up_proj(self.non_linear_func(self.down_proj(x))) * self.alpha
        return out + x if self.residual else out


def apply_adaptformer(block: nn.Module, bottleneck: int, scale: str | float, residual: bool) -> None:
    block.mlp = AdaptFormerMLP(block.mlp, bottleneck, scale, residual)


def apply_adaptformer_decoder(decoder: nn.Module, bottleneck: int, scale: str | float, residual: bool,
                              targets: tuple[str, ...]) -> None:
    """The branch beside each two-way block's MLP (``dec.mlp``): the only MLP of the decoder that is one
    residual step (the hypernetwork and IoU heads end in their outputs, with no input to add to)."""
    from .base import replace_module
    from .decoder_targets import target_mlps

    for name, mlp in target_mlps(decoder, "dec.mlp") if "dec.mlp" in targets else []:
        replace_module(decoder, name, AdaptFormerMLP(mlp, bottleneck, scale, residual))
