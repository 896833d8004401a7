"""Names of the mask decoder's layers for ``--targets``: ``dec.<where>[.<projection>]``.

SAM's mask decoder is a two-way transformer (``transformer.layers.N``: self-attention of the
tokens, token-to-image and image-to-token cross-attention, an MLP), a final token-to-image
attention, and heads: one hypernetwork MLP per output mask and the IoU MLP. Targets name them:

========================  ==========================================================
``dec.self.q``            ``transformer.layers.*.self_attn.q_proj`` (also ``.k``, ``.v``, ``.out``)
``dec.t2i.q``             ``transformer.layers.*.cross_attn_token_to_image.q_proj`` (``.k .v .out``)
``dec.i2t.q``             ``transformer.layers.*.cross_attn_image_to_token.q_proj`` (``.k .v .out``)
``dec.final.q``           ``transformer.final_attn_token_to_image.q_proj`` (``.k .v .out``)
``dec.mlp``               every Linear of ``transformer.layers.*.mlp``
``dec.hyper``             every Linear of ``output_hypernetworks_mlps``
``dec.iou``               every Linear of ``iou_prediction_head``
========================  ==========================================================

Groups: ``dec.self`` (its four projections; likewise ``dec.t2i``, ``dec.i2t``, ``dec.final``),
``dec.q`` (q of all four attentions; likewise ``dec.k``, ``dec.v``, ``dec.out``), ``dec.attn``
(all 16), ``dec.all`` (attention, MLP, hypernetworks, IoU head). A config stores the expanded
names in this table's order. Targets match module-name patterns, not classes, so any decoder
with these names (SAM 2's has them too) takes them.
"""

from __future__ import annotations

import fnmatch

from torch import nn

PREFIX = "dec."
ATTENTIONS = {
    "self": "transformer.layers.*.self_attn",
    "t2i": "transformer.layers.*.cross_attn_token_to_image",
    "i2t": "transformer.layers.*.cross_attn_image_to_token",
    "final": "transformer.final_attn_token_to_image",
}
PROJECTIONS = ("q", "k", "v", "out")
MLPS = {"mlp": "transformer.layers.*.mlp", "hyper": "output_hypernetworks_mlps", "iou": "iou_prediction_head"}

# Every single target, in the order configs store them.
DECODER_TARGETS: tuple[str, ...] = tuple(
    [f"{PREFIX}{a}.{p}" for a in ATTENTIONS for p in PROJECTIONS] + [f"{PREFIX}{m}" for m in MLPS]
)
GROUPS: dict[str, tuple[str, ...]] = {
    **{f"{PREFIX}{a}": tuple(f"{PREFIX}{a}.{p}" for p in PROJECTIONS) for a in ATTENTIONS},
    **{f"{PREFIX}{p}": tuple(f"{PREFIX}{a}.{p}" for a in ATTENTIONS) for p in PROJECTIONS},
    f"{PREFIX}attn": tuple(f"{PREFIX}{a}.{p}" for a in ATTENTIONS for p in PROJECTIONS),
    f"{PREFIX}all": DECODER_TARGETS,
}


def is_decoder_target(name: str) -> bool:
    return name.startswith(PREFIX)


def expand_decoder_targets(names: list[str] | tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """(the single targets the names mean, in canonical order; the names that mean nothing)."""
    chosen, unknown = set(), []
    for name in names:
        if name in DECODER_TARGETS:
            chosen.add(name)
        elif name in GROUPS:
            chosen.update(GROUPS[name])
        else:
            unknown.append(name)
    return tuple(t for t in DECODER_TARGETS if t in chosen), unknown


def decoder_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """The decoder part of a config's targets."""
    return tuple(t for t in targets if is_decoder_target(t))


def _pattern(target: str) -> str:
    """The module-name pattern (relative to the mask decoder) a single target selects."""
    parts = target[len(PREFIX):].split(".")
    if parts[0] in ATTENTIONS:
        return f"{ATTENTIONS[parts[0]]}.{parts[1]}_proj"
    return f"{MLPS[parts[0]]}.*"


def _inside_adapter(name: str, adapters: list[str]) -> bool:
    return any(name.startswith(a + ".") for a in adapters)


def target_linears(decoder: nn.Module, target: str) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the Linear layers of ``decoder`` that ``target`` selects (never one inside a
    PEFT layer: its wrapped Linear and its own low-rank factors are not the decoder's layers)."""
    from .base import MergeableLayer

    pattern = _pattern(target)
    adapters = [n for n, m in decoder.named_modules() if isinstance(m, MergeableLayer)]
    return [(n, m) for n, m in decoder.named_modules()
            if isinstance(m, nn.Linear) and fnmatch.fnmatchcase(n, pattern) and not _inside_adapter(n, adapters)]


def target_attentions(decoder: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """(attention module name, the projections chosen in it) for every attention a target names."""
    out = []
    for key, pattern in ATTENTIONS.items():
        chosen = tuple(p for p in PROJECTIONS if f"{PREFIX}{key}.{p}" in targets)
        if not chosen:
            continue
        out += [(n, chosen) for n, _ in decoder.named_modules() if fnmatch.fnmatchcase(n, pattern)]
    return out


def target_mlps(decoder: nn.Module, target: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of the MLP modules an MLP target names (``dec.mlp``: each block's ``mlp``)."""
    key = target[len(PREFIX):]
    return [(n, m) for n, m in decoder.named_modules() if fnmatch.fnmatchcase(n, MLPS[key])]
