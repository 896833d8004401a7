"""QLoRA: the encoder's Linear layers in 4-bit NF4 (bitsandbytes), LoRA on top.

The 4-bit layers are quantised at once on the device they will run on (CUDA when torch sees
a GPU, else the CPU where this bitsandbytes has CPU 4-bit kernels), and the whole model is
moved there, so a QLoRA model is always quantised before it is trained, loaded or merged.

Merging dequantises every 4-bit layer (``base.dequantized_linear``), the LoRA-wrapped ones
and the others alike, and adds the LoRA deltas: the result is a plain fp32 SAM. It differs
from the same LoRA on the fp32 base by the quantisation error; ``merge`` reports that
difference.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import PeftExportError
from .base import dequantized_linear, is_4bit, replace_module


@functools.lru_cache(maxsize=None)
def _cpu_4bit_works() -> bool:
    """Whether this bitsandbytes quantises and dequantises NF4 on the CPU (recent releases do)."""
    import bitsandbytes.functional as bnbf

    try:
        w = torch.linspace(-1.0, 1.0, 128).reshape(2, 64)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4")
        return bool((bnbf.dequantize_4bit(q, state) - w).abs().max() < 0.2)
    except Exception:  # noqa: BLE001 - any failure means: no CPU kernels in this build
        return False


def qlora_device() -> torch.device:
    """Where QLoRA's 4-bit layers live: CUDA when present, else the CPU if bitsandbytes supports it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PeftExportError("--peft qlora needs bitsandbytes (pip install 'peftexport[qlora]')") from None
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if _cpu_4bit_works():
        return torch.device("cpu")
    raise PeftExportError(
        "--peft qlora needs a CUDA GPU: this bitsandbytes has no CPU 4-bit kernels (0.50.2 has them)"
    )


def require_qlora_device(device: torch.device | str) -> None:
    """Fail early when QLoRA cannot run on ``device`` (training's --device)."""
    device = torch.device(device)
    found = qlora_device()
    if device.type == "cuda" and found.type != "cuda":
        raise PeftExportError("--peft qlora --device cuda: no CUDA GPU is visible")
    if device.type == "cpu" and not _cpu_4bit_works():
        raise PeftExportError("--peft qlora --device cpu: this bitsandbytes has no CPU 4-bit kernels")


def quantize_encoder_linears(image_encoder: nn.Module, device: torch.device) -> None:
    """Replace every nn.Linear of the encoder with a frozen bitsandbytes ``Linear4bit`` (NF4) on ``device``."""
    import bitsandbytes as bnb

    for name, module in list(image_encoder.named_modules()):
        if isinstance(module, nn.Linear):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  quant_type="nf4", device=device)
            # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on the first eval forward and
            # rounds their block scales to bf16 then; keep the NF4 layout that was trained against.
            if hasattr(q, "support_avx512bf16_for_cpu"):
                q.support_avx512bf16_for_cpu = False
            weight = bnb.nn.Params4bit(module.weight.data.float().cpu(), requires_grad=False, quant_type="nf4")
            q.weight = weight.to(device)  # Params4bit quantises when it moves to a device
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data.to(device), requires_grad=False)
            replace_module(image_encoder, name, q)


def dequantize_4bit_linears(root: nn.Module) -> int:
    """Replace every remaining 4-bit Linear under ``root`` by a plain one; returns how many."""
    names = [n for n, m in root.named_modules() if is_4bit(m)]
    for name in names:
        replace_module(root, name, dequantized_linear(root.get_submodule(name)))
    return len(names)
