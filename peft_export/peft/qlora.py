"""QLoRA: the encoder's Linear layers in 4-bit NF4 (bitsandbytes, CUDA only), LoRA on top.

Merging dequantises the 4-bit base (``base.linear_weight_fp64``) and adds the LoRA
delta, so the merged model differs from an fp32-base merge by the quantisation error;
``merge`` reports that difference.
"""

from __future__ import annotations

from torch import nn

from ..errors import PeftExportError


def require_bitsandbytes_cuda() -> None:
    import torch

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PeftExportError(
            "--peft qlora needs bitsandbytes (pip install 'peftexport[qlora]') and a CUDA GPU"
        ) from None
    if not torch.cuda.is_available():
        raise PeftExportError("--peft qlora needs a CUDA GPU: bitsandbytes 4-bit layers do not run on the CPU")


def quantize_encoder_linears(image_encoder: nn.Module) -> None:
    """Replace every nn.Linear of the encoder with a frozen bitsandbytes ``Linear4bit`` (NF4)."""
    require_bitsandbytes_cuda()
    import bitsandbytes as bnb

    for name, module in list(image_encoder.named_modules()):
        if isinstance(module, nn.Linear):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data, requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            parent = image_encoder.get_submodule(parent_name) if parent_name else image_encoder
            setattr(parent, child, q)
