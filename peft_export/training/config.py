"""``TrainConfig``: every option of ``peftexport finetune``, and the checks that run before anything is written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PeftExportError
from ..peft import PeftConfig, parse_targets
from ..peft.decoder_targets import decoder_targets
from ..runtime.intensity import DEFAULT_INTENSITY_RULE

PRECISIONS = ("fp32", "bf16", "fp16")
CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "training.png"
DEFAULT_EPOCHS = 20
# Fields a resumed run may change; everything else comes from the run's own config.
RESUME_OVERRIDES = ("iterations", "epochs", "device", "progress", "save_every", "objects_per_pass", "threads",
                    "embedding_store")
# Where the run lives and how it was started, not what it trains.
_RUN_FIELDS = ("out", "resume", "overwrite", "explicit")
_PATH_FIELDS = ("data", "val_data", "checkpoint")
# Options whose command-line spelling is not the field name.
_OPTION_NAMES = {"model_type": "--model", "intensity": "--intensity-low/--intensity-high", "progress": "-q/--quiet"}


@dataclass
class TrainConfig:
    """Every option of ``peftexport finetune``; defaults follow micro-sam where it has one."""

    out: str
    # data
    data: str | None = None
    images: str | None = None
    labels: str | None = None
    labels_are: str = "instance"
    val_data: str | None = None
    val_fraction: float = 0.1
    patch_size: int = 512
    min_object_size: int = 25
    augment: bool = True
    intensity: dict = field(default_factory=lambda: dict(DEFAULT_INTENSITY_RULE))
    # model and PEFT
    model_type: str = "vit_b"
    checkpoint: str | None = None
    image_size: int | None = None
    peft: str = "lora"
    blocks: str = "late"
    rank: int | None = None
    alpha: float = 1.0
    targets: tuple[str, ...] = ("q", "k", "v", "mlp")
    dropout: float = 0.1
    bottleneck: int = 64
    decoder_peft: str | None = None  # the method on dec.* targets (None: --peft's)
    decoder_rank: int | None = None  # its rank (None: --rank)
    freeze_decoder: bool = False
    freeze_prompt_encoder: bool = False
    instance_decoder: bool = False  # also train micro-sam's AIS decoder (training.ais)
    # optimisation
    iterations: int | None = None
    epochs: int | None = None
    batch_size: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    objects_per_image: int = 25
    sub_iterations: int = 8
    objects_per_pass: int | None = None  # objects per decoder pass (memory, not the result); None: loop.default_objects_per_pass
    mask_input_prob: float = 0.5
    lr_patience: int = 3
    lr_factor: float = 0.9
    patience: int = 10
    # validation
    val_every: int | None = None
    val_objects: int | None = 25
    validate_at_start: bool = True
    # execution
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None  # torch's CPU threads; None: the cores other processes leave free (training.threads)
    seed: int = 0
    grad_checkpointing: bool = False
    cache_frozen_trunk: bool = False
    cache_embeddings: bool = False  # encoder frozen: each training view encoded once (embedding_cache)
    embedding_store: str | None = None  # also keep them on disk, one .npy per view (implies cache_embeddings)
    save_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    # The fields the user set (the CLI knows); None: any field that differs from its default.
    # Only used to check a --resume against the stored run; never stored.
    explicit: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    def peft_config(self) -> PeftConfig:
        targets = parse_targets(self.targets)
        if self.peft not in ("lora", "qlora"):  # encoder targets are LoRA's; dec.* fit every decoder method
            targets = ("q", "v") + decoder_targets(targets)
        return PeftConfig(self.peft, blocks=self.blocks, rank=self.rank, alpha=self.alpha, targets=targets,
                          decoder_method=self.decoder_peft, decoder_rank=self.decoder_rank, dropout=self.dropout, bottleneck=self.bottleneck,
                          train_prompt_encoder=not self.freeze_prompt_encoder,
                          train_mask_decoder=not self.freeze_decoder)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d.pop("explicit")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "targets" else v) for k, v in d.items() if k in known})


def check_config(c: TrainConfig) -> None:
    if c.embedding_store:
        c.cache_embeddings = True
    checks = [
        (c.precision in PRECISIONS, f"--precision: choose one of {', '.join(PRECISIONS)}, got {c.precision!r}"),
        (c.patch_size >= 16, f"--patch-size: must be >= 16, got {c.patch_size}"),
        (c.batch_size >= 1, f"--batch-size: must be >= 1, got {c.batch_size}"),
        (c.objects_per_image >= 1, f"--objects-per-image: must be >= 1, got {c.objects_per_image}"),
        (c.objects_per_pass is None or c.objects_per_pass >= 1, f"--objects-per-pass: must be >= 1, got {c.objects_per_pass}"),
        (c.sub_iterations >= 0, f"--sub-iterations: must be >= 0, got {c.sub_iterations}"),
        (c.lr > 0, f"--lr: must be positive, got {c.lr}"),
        (c.threads is None or c.threads >= 1, f"--threads: must be >= 1, got {c.threads}"),
        (c.iterations is None or c.iterations >= 1, f"--iterations: must be >= 1, got {c.iterations}"),
        (c.epochs is None or c.epochs >= 1, f"--epochs: must be >= 1, got {c.epochs}"),
        (c.val_every is None or c.val_every >= 1, f"--val-every: must be >= 1, got {c.val_every}"),
        (0.0 <= c.mask_input_prob <= 1.0, f"mask_input_prob: must be in [0, 1], got {c.mask_input_prob}"),
        (not (c.iterations and c.epochs), "--iterations and --epochs: give one of them"),
        (not (c.cache_embeddings and c.cache_frozen_trunk),
         "--cache-embeddings and --cache-frozen-trunk: give one (whole embeddings, or the frozen blocks' output)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise PeftExportError(msg)
    from ..models.family import is_sam2_type

    if c.cache_embeddings and is_sam2_type(c.model_type):
        raise PeftExportError(f"--cache-embeddings: not available with {c.model_type} yet (SAM 2's decoder also "
                              "reads the encoder's high-resolution features, which the cache does not keep)")
    if c.instance_decoder:  # validation scores AIS with the runtime's post-processing
        from ..runtime.instances import AIS_EXTRA_HINT, require_ais_packages

        try:
            require_ais_packages()
        except PeftExportError:
            raise PeftExportError(f"--instance-decoder: validation needs scikit-image and scipy; {AIS_EXTRA_HINT}") from None


def option_name(field_name: str) -> str:
    """The command-line spelling of a TrainConfig field (``rank`` -> ``--rank``)."""
    return _OPTION_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def _same(name: str, a, b) -> bool:
    if name in _PATH_FIELDS and a is not None and b is not None:
        return str(a) == str(b) or Path(a).resolve() == Path(b).resolve()
    if name == "targets":
        return tuple(a) == tuple(b)
    return a == b


def resume_differences(stored: TrainConfig, requested: TrainConfig) -> list[str]:
    """What ``requested`` asks that the stored run does not do, as ``--option VALUE (the run has X)``.

    A resumed run continues with its stored settings; only ``RESUME_OVERRIDES`` may change.
    Without ``requested.explicit`` a field counts as asked for when it differs from its default.
    """
    defaults = TrainConfig(out="")
    diffs = []
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        if name in RESUME_OVERRIDES or name in _RUN_FIELDS:
            continue
        want = getattr(requested, name)
        if requested.explicit is not None:
            if name not in requested.explicit:
                continue
        elif _same(name, want, getattr(defaults, name)):
            continue
        have = getattr(stored, name)
        if not _same(name, want, have):
            show = (lambda v: ",".join(v)) if name == "targets" else (lambda v: v)
            diffs.append(f"{option_name(name)} {show(want)} (the run has {show(have)})")
    return diffs
