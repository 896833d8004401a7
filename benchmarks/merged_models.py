"""Random-weight SAM models with a PEFT adapter, merged and exported: the models the CPU benchmarks time.

Shared by bench_cpu.py, compare_peers.py and bench_vit_t.py (a module of its own so those scripts
do not import each other)."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from peft_export.peft import PeftConfig, merge_peft  # noqa: E402
from peft_export.peft.adapters import AdaptedModel, build_adapted_model, load_model_source  # noqa: E402

warnings.filterwarnings("ignore", message="no checkpoint given")

# name -> PEFT config: LoRA r32 on q,v in every block (the paper's default LoRA, also the exported
# model) and the paper's recipe, late LoRA r32 on q,k,v,mlp; the others on request.
METHODS = {
    "lora-qv": dict(method="lora", rank=32, targets=("q", "v"), blocks="all"),
    "late-lora-qkvmlp": dict(method="lora", rank=32, targets=("q", "k", "v", "mlp"), blocks="late"),
    "fact": dict(method="fact", rank=16, blocks="all"),
    "ssf": dict(method="ssf", blocks="all"),
    "adaptformer": dict(method="adaptformer", bottleneck=64, blocks="all"),
}
def randomize_adapter(model: torch.nn.Module, seed: int) -> None:
    """Small random values in every adapter tensor: a zero LoRA B would make merged == base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.image_encoder.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * 0.02
                p.copy_(1.0 + noise if name.endswith((".scale", ".alpha")) else p + noise)


def build(method: str, model_type: str, size: int) -> AdaptedModel:
    adapted = build_adapted_model(PeftConfig(**METHODS[method]), model_type, None, size, seed=0)
    randomize_adapter(adapted.model, seed=1)
    adapted.model.eval()
    return adapted


def build_merged_checkpoint(out: Path, model_type: str, size: int, method: str = "lora-qv") -> Path:
    """A plain SAM state dict (what `peftexport merge` writes) of ``method`` merged into random weights."""
    path = out / f"merged_{model_type}_{size}.pth"
    if not path.exists():
        torch.save(merge_peft(build(method, model_type, size).model).state_dict(), path)
    return path


def export_model(checkpoint: Path, out: Path, precisions: list[str], attention: str = "plain") -> tuple[Path, float]:
    """merge-and-export of a merged checkpoint (every graph verified); returns (dir, seconds)."""
    from peft_export.export import merge_and_export

    t = time.perf_counter()
    merge_and_export(load_model_source(merged=checkpoint), out, precisions=precisions, overwrite=True,
                     progress=False, attention=attention)
    return out, time.perf_counter() - t
