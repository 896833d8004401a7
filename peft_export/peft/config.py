"""The PEFT configuration: which method, where, and its hyper-parameters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import PeftExportError
from .decoder_targets import expand_decoder_targets, is_decoder_target

LORA_TARGETS = ("q", "k", "v", "mlp")
DEFAULT_RANK = {"lora": 32, "qlora": 32, "fact": 16}


@dataclass
class PeftConfig:
    """Everything needed to rebuild an adapted model from its base.

    ``blocks`` is a placement spec: ``all``, ``late`` (the last half of the encoder
    blocks, the paper's recipe; on SAM 2's Hiera the last whole stages holding at least half
    of them), a range ``6-11``, or a list ``0,3,5``.
    """

    method: str
    blocks: str = "all"
    rank: int | None = None  # lora/qlora 32, fact 16 when not given
    alpha: float = 1.0  # LoRA scale: delta = alpha * B @ A (no 1/r, as micro-sam)
    targets: tuple[str, ...] = ("q", "v")  # LoRA: any of q, k, v, mlp; every method: decoder layers dec.* (decoder_targets)
    decoder_method: str | None = None  # the method on the dec.* targets; None: ``method``
    decoder_rank: int | None = None  # LoRA/FacT rank on the dec.* targets; None: ``rank``
    dropout: float = 0.1  # FacT dropout
    bottleneck: int = 64  # AdaptFormer
    adaptformer_scale: str | float = "learnable"
    adaptformer_residual: bool = False  # micro-sam <= 1.8 added the input again: mlp(x) + x + branch
    ssf_patch_embed: bool = True  # micro-sam's patch-embedding SSF branch never fires: False to match it
    train_prompt_encoder: bool = True
    train_mask_decoder: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank is None:
            self.rank = DEFAULT_RANK.get(self.method)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        for key in ("decoder_method", "decoder_rank"):
            if d[key] is None:  # configs without decoder PEFT stay readable by older releases
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PeftExportError(f"PEFT config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)


def resolve_blocks(spec: str | list[int] | tuple[int, ...], depth: int, late_start: int | None = None) -> list[int]:
    """Block indices of a placement spec, checked against the encoder depth (``late``: from
    ``late_start``, by default the last half)."""
    if isinstance(spec, (list, tuple)):
        blocks = [int(b) for b in spec]
    else:
        text = str(spec).strip().lower()
        if text == "all":
            return list(range(depth))
        if text == "late":
            return list(range(depth // 2 if late_start is None else late_start, depth))
        if text in ("none", ""):
            return []
        blocks = []
        try:
            for part in text.split(","):
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    if hi < lo:
                        raise ValueError
                    blocks.extend(range(lo, hi + 1))
                else:
                    blocks.append(int(part))
        except ValueError:
            raise PeftExportError(
                f"--blocks {spec!r}: expected 'all', 'late', a range like 6-11 or a list like 0,3,5"
            ) from None
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise PeftExportError(f"--blocks {spec!r}: block {bad[0]} is out of range; the encoder has blocks 0-{depth - 1}")
    return sorted(set(blocks))


def parse_targets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Encoder targets (q, k, v, mlp: LoRA's, in the blocks of ``--blocks``) then the mask decoder's
    (``dec.*``, see ``decoder_targets``: groups expanded), each part in its canonical order."""
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    decoder, bad = expand_decoder_targets([t for t in items if is_decoder_target(t)])
    bad += [t for t in items if not is_decoder_target(t) and t not in LORA_TARGETS]
    if bad or not items:
        raise PeftExportError(f"--targets {text!r}: {'unknown ' + ', '.join(bad) + '; ' if bad else ''}choose from "
                              f"{', '.join(LORA_TARGETS)} (encoder) and dec.all, dec.attn, dec.self, dec.t2i, dec.i2t, "
                              "dec.final, dec.q/k/v/out, dec.<attention>.<q|k|v|out>, dec.mlp, dec.hyper, dec.iou "
                              "(mask decoder; docs/peft_methods.md)")
    return tuple(t for t in LORA_TARGETS if t in items) + decoder


def encoder_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """The encoder part of a config's targets (LoRA's q, k, v, mlp)."""
    return tuple(t for t in targets if not is_decoder_target(t))
