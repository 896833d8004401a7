"""Which adapters can share one trunk, where it ends, and the proof that its weights are every adapter's.

Rules (checked before any slow work):

* adapter names are file-name safe (letters, digits, '-'), unique, not ``all`` or ``base``;
* every adapter has the same base: model type, image size and, for adapter runs, the base
  checkpoint's sha256 (or the same random-init seed); micro-sam checkpoints record no base
  of their own, so for them the weight proof below is the check;
* every adapter preprocesses images alike (the same intensity rule), since the trunk sees one
  input for all of them;
* the split block is the first encoder block any sharing adapter trains in
  (``models.encoder_split.first_trainable_block``); an adapter that trains the patch or
  positional embedding (or block 0) leaves nothing worth sharing: refused with
  ``shared_trunk=True``, given its own whole encoder otherwise.

The proof: the merged weights of the patch embedding, positional embedding and blocks before
the split are compared bit for bit (raw bytes, dtype and shape) with the base's and with every
other adapter's; a single differing tensor stops the export.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from segment_anything.modeling import Sam

from ..errors import PeftExportError
from ..models import RANDOM_INIT
from ..models.encoder_split import first_trainable_block, is_trunk_key
from ..peft.adapters import AdaptedModel

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
RESERVED_NAMES = ("all", "base")  # predict --adapter all; head_base.onnx


def check_adapter_name(name: str, where: str = "--adapter") -> str:
    if not ADAPTER_NAME.fullmatch(name or ""):
        raise PeftExportError(
            f"{where}: adapter name {name!r} must be 1-64 letters, digits or '-' (it names files: head_<NAME>.onnx)"
        )
    if name in RESERVED_NAMES:
        raise PeftExportError(f"{where}: adapter name {name!r} is reserved; choose another")
    return name


def source_kind(adapted: AdaptedModel) -> str:
    """'merged' (a plain checkpoint), 'micro-sam' (a training checkpoint: it is its own base record) or
    'adapter' (an adapter run, or a model built in memory on the base it records)."""
    if adapted.config is None:
        return "merged"
    if adapted.meta.get("format"):
        return "adapter"
    own_base = adapted.source and adapted.base.checkpoint and Path(adapted.base.checkpoint) == Path(adapted.source)
    return "micro-sam" if own_base else "adapter"


def describe_base(adapted: AdaptedModel) -> str:
    b = adapted.base
    where = "random init, seed %d" % b.seed if b.sha256 == RANDOM_INIT else f"sha256 {b.sha256[:12]}... ({b.checkpoint})"
    return f"{b.model_type}, image size {b.image_size}, {where}"


def check_same_base(adapters: Mapping[str, AdaptedModel]) -> None:
    """Refuse adapters of different bases or intensity rules, naming both."""
    if not adapters:
        raise PeftExportError("--adapter: give at least one adapter")
    names = list(adapters)
    for name in names:
        if source_kind(adapters[name]) == "merged":
            raise PeftExportError(
                f"{name}: a merged checkpoint does not say which blocks it changed, so it cannot share a trunk; "
                "export it on its own"
            )
    first = names[0]
    a = adapters[first]
    for name in names[1:]:
        b = adapters[name]
        same = (a.base.model_type, a.base.image_size) == (b.base.model_type, b.base.image_size)
        if same and "micro-sam" not in (source_kind(a), source_kind(b)):
            same = a.base.sha256 == b.base.sha256 and (a.base.sha256 != RANDOM_INIT or a.base.seed == b.base.seed)
        if not same:
            raise PeftExportError(
                f"{name}: base ({describe_base(b)}) differs from {first}'s base ({describe_base(a)}); "
                "adapters of one export must share their base model"
            )
        if dict(a.intensity) != dict(b.intensity):
            raise PeftExportError(
                f"{name}: intensity rule {dict(b.intensity)} differs from {first}'s {dict(a.intensity)}; "
                "adapters of one export must preprocess images alike"
            )


@dataclass
class SharingPlan:
    """Who shares the trunk (blocks before ``split``) and who gets a whole encoder of its own, and why."""

    split: int | None  # None: no trunk
    shared: list[str]
    separate: dict[str, str] = field(default_factory=dict)  # name -> why
    first_trainable: dict[str, int | None] = field(default_factory=dict)  # None: the stem trains


def _what_trains(adapted: AdaptedModel) -> str:
    return adapted.config.method if adapted.config is not None else "its weights"


def _why_not_shareable(adapted: AdaptedModel, first: int | None) -> str | None:
    if first is None:
        return (f"it ({_what_trains(adapted)}) changes the patch or positional embedding, so none of its encoder "
                "is the base's: nothing to share")
    if first == 0:
        return (f"it ({_what_trains(adapted)}) changes block 0, so only the patch embedding would be shared "
                "(no time saved)")
    return None


def plan_sharing(adapters: Mapping[str, AdaptedModel], shared_trunk: bool | None = None) -> SharingPlan:
    """The split block and the sharing adapters.

    An adapter that trains the patch or positional embedding, or block 0, leaves nothing worth
    sharing. ``shared_trunk``: True requires every adapter on one trunk (refused, with the
    reason, for such an adapter); None (default) shares among the adapters that can, when there
    are at least two; False gives every adapter its own whole encoder.
    """
    first = {n: first_trainable_block(a.model) for n, a in adapters.items()}
    if shared_trunk is False:
        return SharingPlan(None, [], {n: "sharing was switched off (--no-shared-trunk)" for n in adapters}, first)
    separate = {n: why for n in adapters if (why := _why_not_shareable(adapters[n], first[n])) is not None}
    if separate and shared_trunk:
        n, why = next(iter(separate.items()))
        raise PeftExportError(
            f"--shared-trunk: adapter {n} cannot share a trunk: {why}; export without --shared-trunk "
            "(it gets its own encoder) or leave it out"
        )
    shared = [n for n in adapters if n not in separate]
    if len(shared) < 2 and not shared_trunk:
        for n in shared:
            separate[n] = "no other adapter can share a trunk with it"
        return SharingPlan(None, [], separate, first)
    split = min(first[n] for n in shared)  # type: ignore[type-var]
    return SharingPlan(split, shared, separate, first)


# ---- weights: which tensors belong where, and bit-for-bit comparison ------------------------


def _is_trunk_key(model: Sam, key: str, split: int) -> bool:
    prefix = "image_encoder."
    return key.startswith(prefix) and is_trunk_key(model.image_encoder, key[len(prefix):], split)


def trunk_state(model: Sam, split: int) -> dict[str, torch.Tensor]:
    """Patch embedding, positional embedding (TinyViT: its MBConv stage) and blocks[:split]: what ``trunk.onnx`` holds."""
    return {k: v.detach() for k, v in model.state_dict().items() if _is_trunk_key(model, k, split)}


def head_state(model: Sam, split: int) -> dict[str, torch.Tensor]:
    """Blocks[split:] and the neck: what a ``head_<NAME>.onnx`` holds."""
    return {k: v.detach() for k, v in model.state_dict().items()
            if k.startswith("image_encoder.") and not _is_trunk_key(model, k, split)}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def first_difference(reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor]) -> str | None:
    """None when both hold the same tensors bit for bit; else what differs first."""
    if set(reference) != set(candidate):
        extra = sorted(set(candidate) - set(reference))
        missing = sorted(set(reference) - set(candidate))
        return f"tensor {(extra or missing)[0]} is {'extra' if extra else 'missing'}"
    for k, a in reference.items():
        b = candidate[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{k} is {b.dtype} {tuple(b.shape)}, not {a.dtype} {tuple(a.shape)}"
        if not torch.equal(_bytes(a), _bytes(b)):
            diff = (a.double() - b.double()).abs().max().item()
            return f"{k} differs (max abs difference {diff:.3g})"
    return None


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes(t).numpy().tobytes())
    return h.hexdigest()


def prove_trunk(reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor], name: str,
                against: str) -> None:
    """Raise unless ``candidate`` (adapter ``name``'s merged trunk) equals ``reference`` bit for bit."""
    diff = first_difference(reference, candidate)
    if diff is not None:
        raise PeftExportError(
            f"{name}: its merged weights before the split are not {against}'s ({diff}); "
            "the adapters do not share a base, so they cannot share a trunk (export them separately)"
        )
