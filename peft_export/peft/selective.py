"""Methods that add no layer and only unfreeze base tensors of the chosen blocks.

Same parameter selection as micro-sam's ``AttentionSurgery`` (names starting with
``attn``), ``BiasSurgery`` (ending in ``bias``), ``LayerNormSurgery`` (``norm1``/``norm2``)
and ``ClassicalSurgery`` (whole block: "late full finetuning"). Their adapters are
base tensors, so merging is a copy. TinyViT (vit_t) blocks: ``attn.*`` includes the
attention's own LayerNorm and its window biases; its LayerNorms are ``attn.norm`` and
``mlp.norm``; BatchNorm statistics never train (only their affine weight and bias).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

SELECTORS: dict[str, Callable[[str], bool]] = {
    "attention": lambda name: name.startswith("attn"),
    "bias": lambda name: name.endswith("bias"),
    "layernorm": lambda name: "norm1" in name or "norm2" in name or name.startswith(("attn.norm.", "mlp.norm.")),
    "full": lambda name: True,
}


def unfreeze_block(block: nn.Module, method: str) -> None:
    select = SELECTORS[method]
    for name, param in block.named_parameters():
        if select(name):
            param.requires_grad_(True)
