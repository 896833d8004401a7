"""PEFT on SAM's mask decoder: the ``dec.*`` targets of a config, with the methods that fit them.

Each method's decoder layer lives in the method's own file, next to its encoder layer and its fold
(``lora.LinearLoRA``, ``ssf.ScaleShift``, ``fact.FacTAttention``, ``adaptformer.AdaptFormerMLP``);
this module only checks which method fits which target and installs them. With decoder targets
the decoder's own weights stay frozen: only the adapter layers train (``apply_peft`` calls
``apply_decoder_peft`` after the encoder's method).
"""

from __future__ import annotations

from typing import Callable

from segment_anything.modeling import Sam

from ..errors import PeftExportError
from .adaptformer import apply_adaptformer_decoder
from .config import PeftConfig
from .decoder_targets import PROJECTIONS, decoder_targets
from .fact import apply_fact_decoder
from .lora import apply_lora_decoder
from .ssf import apply_ssf_decoder


def _lora(decoder, cfg: PeftConfig, targets: tuple[str, ...]) -> None:
    apply_lora_decoder(decoder, cfg.decoder_rank or cfg.rank or 8, targets, cfg.alpha)


def _ssf(decoder, cfg: PeftConfig, targets: tuple[str, ...]) -> None:
    apply_ssf_decoder(decoder, targets)


def _fact(decoder, cfg: PeftConfig, targets: tuple[str, ...]) -> None:
    apply_fact_decoder(decoder, cfg.decoder_rank or cfg.rank or 16, cfg.dropout, targets)


def _adaptformer(decoder, cfg: PeftConfig, targets: tuple[str, ...]) -> None:
    apply_adaptformer_decoder(decoder, cfg.bottleneck, cfg.adaptformer_scale, cfg.adaptformer_residual, targets)


def _fact_fits(target: str) -> bool:
    return target.rsplit(".", 1)[-1] in PROJECTIONS[:3]  # q, k, v of an attention


# method -> (installer, which single targets it fits, what it fits in words)
DECODER_METHODS: dict[str, tuple[Callable, Callable[[str], bool], str]] = {
    "lora": (_lora, lambda t: True, "every dec.* target"),
    "qlora": (_lora, lambda t: True, "every dec.* target (LoRA: the decoder is not quantised)"),
    "ssf": (_ssf, lambda t: True, "every dec.* target"),
    "fact": (_fact, _fact_fits, "the q, k, v projections of the attentions (dec.q, dec.k, dec.v, dec.<attention>.q ...)"),
    "adaptformer": (_adaptformer, lambda t: t == "dec.mlp", "dec.mlp (the two-way blocks' MLPs)"),
}


def decoder_method(config: PeftConfig) -> str:
    """The method on the decoder targets: ``decoder_method``, else the config's own."""
    return config.decoder_method or config.method


def check_decoder_config(config: PeftConfig) -> tuple[str, ...]:
    """The config's decoder targets, refused with a reason when its decoder method does not fit them."""
    targets = decoder_targets(config.targets)
    if not targets:
        if config.decoder_method is not None:
            raise PeftExportError(f"--decoder-peft {config.decoder_method}: give the decoder layers it adapts in "
                                  "--targets (e.g. dec.all; docs/peft_methods.md)")
        return targets
    method = decoder_method(config)
    if method not in DECODER_METHODS:
        raise PeftExportError(
            f"--targets {','.join(targets)}: {method} has no mask-decoder form; choose --decoder-peft from "
            f"{', '.join(DECODER_METHODS)}")
    _, fits, where = DECODER_METHODS[method]
    bad = [t for t in targets if not fits(t)]
    if bad:
        raise PeftExportError(f"--targets: {method} on the mask decoder fits {where}, not {', '.join(bad)}")
    rank = config.decoder_rank if config.decoder_rank is not None else config.rank
    if method in ("lora", "qlora", "fact") and rank is not None and rank <= 0:
        raise PeftExportError(f"--decoder-rank must be a positive integer for {method}, got {rank}")
    return targets


def apply_decoder_peft(sam: Sam, config: PeftConfig) -> None:
    """Install the decoder method on the config's ``dec.*`` targets; the decoder's own weights freeze and
    only the layers it adds train. No decoder targets: nothing changes."""
    targets = check_decoder_config(config)
    if not targets:
        return
    decoder = sam.mask_decoder
    device = next(decoder.parameters()).device
    before = {id(p) for p in decoder.parameters()}
    for p in decoder.parameters():
        p.requires_grad_(False)
    DECODER_METHODS[decoder_method(config)][0](decoder, config, targets)
    if device.type != "meta":
        decoder.to(device)  # QLoRA moved the model to its GPU before the decoder layers were made
    for p in decoder.parameters():
        if id(p) not in before:
            p.requires_grad_(True)
