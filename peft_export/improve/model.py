"""The model ``improve`` trains: the export's torch model with LoRA on its mask decoder, only that trains.

The new adapter holds both parts and loads on the export's own base: what the export's adapter
trained (its encoder PEFT, a fully trained decoder or prompt encoder, the AIS decoder) is kept
frozen and written again with it (``AdaptedModel.carried``), and its config is the old one with the
decoder targets added (``decoder_method="lora"``, ``decoder_rank``). A model that already has
decoder adapters (an export ``improve`` wrote) trains those further instead of adding new ones.
A merged or plain source becomes the base of a decoder-only adapter.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..peft import PeftConfig, apply_peft, parse_targets
from ..peft.adapters import AdaptedModel
from ..peft.decoder import apply_decoder_peft
from ..peft.decoder_targets import decoder_targets


def with_decoder_lora(adapted: AdaptedModel, targets: str | tuple[str, ...] = "dec.all", rank: int = 8,
                      alpha: float = 1.0, seed: int = 0) -> AdaptedModel:
    """``adapted`` (changed in place) with trainable decoder LoRA on ``targets``; everything else frozen.
    ``alpha`` applies to a plain source; an adapter's config keeps its own (one alpha per config).
    The new LoRA A matrices are drawn from ``seed`` (the caller's torch generator is left as it was), so
    the same call trains the same adapter whatever ran before it in the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _with_decoder_lora(adapted, targets, rank, alpha)


def _with_decoder_lora(adapted: AdaptedModel, targets: str | tuple[str, ...], rank: int, alpha: float) -> AdaptedModel:
    sam = adapted.model
    wanted = decoder_targets(parse_targets(targets))
    old = adapted.config
    if old is None:  # a plain model: it is the base, the adapter is the decoder part alone
        config = PeftConfig("lora", blocks="none", rank=rank, alpha=alpha, targets=wanted,
                            train_prompt_encoder=False, train_mask_decoder=False)
        apply_peft(sam, config)
        return replace(adapted, config=config, carried=(), meta={})
    own = dict(sam.named_parameters())
    before = {id(p) for p in sam.parameters() if p.requires_grad} | {id(own[n]) for n in adapted.carried}  # its file
    if decoder_targets(old.targets):  # decoder adapters already there: they train on
        config = old
        train = {id(p) for p in sam.mask_decoder.parameters() if p.requires_grad}
    else:
        config = replace(old, targets=tuple(old.targets) + wanted, decoder_method="lora", decoder_rank=rank)
        existing = {id(p) for p in sam.parameters()}
        apply_decoder_peft(sam, config)
        train = {id(p) for p in sam.parameters()} - existing
    for p in sam.parameters():
        p.requires_grad_(id(p) in train)
    after = {id(p): n for n, p in sam.named_parameters()}
    carried = tuple(after[i] for i in before - train if i in after)
    sam.peft_config = config  # type: ignore[attr-defined]
    return replace(adapted, config=config, carried=carried, meta={})
