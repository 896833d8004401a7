"""Adapter files: ``adapter.safetensors`` (only what training changed) + ``adapter.json``.

Also the one entry point every command uses to get "the adapted model" from what the
user has: an adapter run, a micro-sam training checkpoint, or a plain/merged checkpoint.
Each may carry micro-sam's instance decoder (AIS): adapter files store it under
``instance_decoder.*`` (all of its state, BatchNorm statistics included), micro-sam files
as ``decoder_state``.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from .. import __version__
from ..errors import PeftExportError
from ..fsutil import atomic_file, sha256_file
from ..models import (
    RANDOM_INIT, BaseModelInfo, InstanceDecoder, build_sam_architecture, check_model_type, decoder_from_state,
    infer_model_type, instance_decoder_from_checkpoint, load_sam_and_decoder, load_state_strict,
    model_image_size, random_instance_decoder, read_checkpoint, sam_state_from_checkpoint, checkpoint_image_size,
)
from ..runtime.intensity import DEFAULT_INTENSITY_RULE
from .apply import apply_peft, trainable_state
from .config import PeftConfig

ADAPTER_FORMAT = "peftexport-adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
WEIGHTS_SHA256 = "weights_sha256"  # adapter.json's digest of adapter.safetensors (pairs the two files)
DECODER_PREFIX = "instance_decoder."  # tensors of the AIS decoder inside adapter.safetensors


@dataclass
class AdaptedModel:
    """A model with its PEFT layers installed, and where it came from."""

    model: Sam
    config: PeftConfig | None  # None: a plain (already merged or base) model
    base: BaseModelInfo
    intensity: dict = field(default_factory=lambda: dict(DEFAULT_INTENSITY_RULE))
    source: str = ""  # what the user passed, for reports
    meta: dict = field(default_factory=dict)
    instance_decoder: InstanceDecoder | None = None  # micro-sam's AIS decoder, when the model has one
    # Tensors the adapter file holds although they do not train now: an earlier adapter's, frozen
    # while a new part trains on top of it (``improve``). Loading copies them like any other.
    carried: tuple[str, ...] = ()


def build_adapted_model(
    config: PeftConfig,
    model_type: str | None,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    instance_decoder: bool = False,
) -> AdaptedModel:
    """Base SAM (checkpoint or seeded random init) with the PEFT method installed.

    ``instance_decoder``: also give it micro-sam's AIS decoder, the checkpoint's own
    (``decoder_state``) when it has one, else a freshly initialised one (seeded).
    """
    sam, base, decoder = load_sam_and_decoder(model_type, checkpoint, image_size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)  # adapter init is reproducible too
        apply_peft(sam, config)
    if instance_decoder and decoder is None:
        decoder = random_instance_decoder(seed + 3)
    return AdaptedModel(sam, config, base, instance_decoder=decoder if instance_decoder else None)


def decoder_tensors(decoder: InstanceDecoder) -> dict[str, torch.Tensor]:
    """The AIS decoder's whole state (parameters and BatchNorm statistics) under ``instance_decoder.``."""
    return {DECODER_PREFIX + k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}


def split_decoder_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(SAM tensors, AIS decoder state without its prefix)."""
    sam = {k: v for k, v in tensors.items() if not k.startswith(DECODER_PREFIX)}
    dec = {k[len(DECODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(DECODER_PREFIX)}
    return sam, dec


def save_adapter(
    adapted: AdaptedModel,
    out_dir: str | Path,
    extra: dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` into ``out_dir`` (each atomically)."""
    if adapted.config is None:
        raise PeftExportError("save_adapter: the model has no PEFT config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = trainable_state(adapted.model)
    if adapted.carried:
        own = dict(adapted.model.named_parameters())
        tensors.update({n: own[n].detach().cpu().contiguous() for n in adapted.carried})
    n_adapter = len(tensors)
    if adapted.instance_decoder is not None:
        tensors.update(decoder_tensors(adapted.instance_decoder))
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise PeftExportError(f"{out_dir}: refusing to save an adapter with NaN/Inf in {bad[0]}")
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "peftexport_version": __version__,
        "peft": adapted.config.to_dict(),
        "base": adapted.base.to_dict(),
        "intensity": adapted.intensity,
        "num_tensors": n_adapter,
        "num_parameters": int(sum(v.numel() for k, v in tensors.items() if not k.startswith(DECODER_PREFIX))),
        "instance_decoder": _decoder_meta(adapted.instance_decoder),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra or {})
    patch = ((extra or {}).get("training") or {}).get("patch_size")
    if patch:  # how training crops met the encoder: the tiled runtime's default tile reproduces it
        meta["training_scale"] = {"crop_size": int(patch), "model_input": model_image_size(adapted.model)}
    with atomic_file(out_dir / ADAPTER_WEIGHTS, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT})
        # Each file is renamed into place on its own: a crash between the two renames, or files copied
        # from two runs, leave a pair that does not belong together; the digest tells (load_adapter).
        meta[WEIGHTS_SHA256] = sha256_file(tmp)
    with atomic_file(out_dir / ADAPTER_META, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return out_dir


def _decoder_meta(decoder: InstanceDecoder | None) -> dict | None:
    if decoder is None:
        return None
    from ..models import MAP_NAMES

    return {"maps": list(MAP_NAMES), "conv_transpose": decoder.conv_transpose, "prefix": DECODER_PREFIX,
            "num_parameters": int(sum(p.numel() for p in decoder.parameters()))}


def _adapter_paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        return path / ADAPTER_WEIGHTS, path / ADAPTER_META
    if path.suffix == ".json":
        return path.with_name(ADAPTER_WEIGHTS) if path.name == ADAPTER_META else path.with_suffix(".safetensors"), path
    return path, path.with_suffix(".json") if path.name != ADAPTER_WEIGHTS else path.with_name(ADAPTER_META)


def read_adapter_meta(path: str | Path) -> dict:
    weights, meta_path = _adapter_paths(path)
    given = Path(path)
    if not given.exists():
        raise PeftExportError(f"{path}: not found (expected a finetune run directory or its adapter.safetensors)")
    if given.is_dir() and not meta_path.is_file():
        raise PeftExportError(f"{path}: no {ADAPTER_META} in this directory (is it a finetune run directory? "
                              "a run interrupted before its first validation has none yet)")
    if not meta_path.is_file():
        raise PeftExportError(f"{path}: not an adapter ({meta_path.name} not found beside it; expected a finetune "
                              "run directory or its adapter.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftExportError(f"{meta_path}: not valid JSON ({exc.args[0] if exc.args else exc})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise PeftExportError(f"{meta_path}: not a peftexport adapter (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > ADAPTER_FORMAT_VERSION:
        raise PeftExportError(
            f"{meta_path}: adapter format {meta['format_version']} is newer than this peftexport "
            f"({__version__}, format {ADAPTER_FORMAT_VERSION}); upgrade peftexport"
        )
    return meta


def load_adapter(
    path: str | Path,
    checkpoint: str | Path | None = None,
    force: bool = False,
    image_size: int | None = None,
    model_type: str | None = None,
) -> AdaptedModel:
    """Rebuild the adapted model of an adapter file / run directory on its base.

    The base is ``checkpoint`` if given, else the path recorded at training, else the
    seeded random init recorded there. A base of another type or image size is refused,
    and so is a ``model_type`` (--model) other than the adapter's; another sha256 is
    refused unless ``force`` (then a warning).
    """
    weights, meta_path = _adapter_paths(path)
    meta = read_adapter_meta(path)
    config = PeftConfig.from_dict(meta["peft"])
    base = meta["base"]
    if model_type is not None and model_type != base["model_type"]:
        check_model_type(model_type)  # an unknown name is named as such
        raise PeftExportError(
            f"{meta_path}: adapter was trained on {base['model_type']}, --model {model_type} was asked "
            "(leave --model out: the adapter records its model)"
        )
    if image_size is not None and image_size != base["image_size"]:
        raise PeftExportError(
            f"{meta_path}: adapter was trained at image size {base['image_size']}, --image-size {image_size} was asked"
        )
    if checkpoint is None and base["sha256"] != RANDOM_INIT:
        recorded = base.get("checkpoint")
        if recorded and Path(recorded).is_file():
            checkpoint = recorded
        else:
            raise PeftExportError(
                f"{meta_path}: adapter was trained on {recorded or 'a checkpoint'} (sha256 {base['sha256'][:12]}...); "
                "pass it with --checkpoint"
            )
    if checkpoint is not None:
        state = sam_state_from_checkpoint(read_checkpoint(checkpoint), checkpoint)
        found = infer_model_type(state, checkpoint)
        if found != base["model_type"]:
            raise PeftExportError(
                f"{checkpoint}: base checkpoint is {found}, but the adapter {path} was trained on {base['model_type']}"
            )
        digest = sha256_file(checkpoint)
        if digest != base["sha256"]:
            msg = (
                f"{checkpoint}: sha256 {digest[:12]}... differs from the adapter's base "
                f"{base['sha256'][:12]}... ({base.get('checkpoint')})"
            )
            if not force:
                raise PeftExportError(msg + "; pass --force to use it anyway")
            warnings.warn(msg + "; continuing because of --force", stacklevel=2)
        del state
    tensors, decoder_state = split_decoder_tensors(read_adapter_tensors(weights))  # before the slow base build
    check_adapter_pair(weights, meta_path, meta)  # after the read: an unreadable file is named as such
    decoder = decoder_from_state(decoder_state, str(weights)) if decoder_state else None
    adapted = build_adapted_model(config, base["model_type"], checkpoint, base["image_size"], seed=base.get("seed", 0))
    adapted.instance_decoder = decoder
    own = dict(adapted.model.named_parameters())
    trainable = {n for n, p in own.items() if p.requires_grad}
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise PeftExportError(f"{weights}: tensor {unknown[0]} does not exist in a {config.method} model of this base")
    missing = sorted(trainable - set(tensors))
    if missing:
        raise PeftExportError(f"{weights}: adapter lacks {len(missing)} trained tensor(s), e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise PeftExportError(
                    f"{weights}: {name} has shape {tuple(value.shape)}, the model expects {tuple(own[name].shape)}"
                )
            own[name].copy_(value)
    adapted.carried = tuple(sorted(set(tensors) - trainable))  # frozen tensors the file holds: saved again with it
    adapted.intensity = meta.get("intensity", dict(DEFAULT_INTENSITY_RULE))
    adapted.source = str(path)
    adapted.meta = meta
    return adapted


def check_adapter_pair(weights: Path, meta_path: Path, meta: dict) -> None:
    """Refuse weights that are not the ones ``adapter.json`` was written with.

    Adapters saved before the digest was recorded have no ``weights_sha256``: they load unchecked.
    """
    recorded = meta.get(WEIGHTS_SHA256)
    if recorded is None or not weights.is_file():
        return
    digest = sha256_file(weights)
    if digest != recorded:
        raise PeftExportError(
            f"{weights}: sha256 {digest[:12]}... is not the {recorded[:12]}... recorded in {meta_path} "
            "(the two files come from different saves: an interrupted save or a copy mixing two runs); "
            "use a matching pair, e.g. the run directory's last complete adapter"
        )


def read_adapter_tensors(weights: Path) -> dict[str, torch.Tensor]:
    if not weights.is_file():
        raise PeftExportError(f"{weights}: adapter weights not found")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PeftExportError(f"{weights}: not a readable safetensors file ({exc})") from None


def micro_sam_peft_config(
    checkpoint: str | Path,
    peft: str | None,
    rank: int | None = None,
    blocks: str = "all",
    targets: str = "q,v",
    adaptformer_residual: bool = False,
) -> PeftConfig | None:
    """The PEFT config a micro-sam checkpoint was trained with, from --peft and its options
    (their files do not record it); an unknown method is reported before any file is read.
    None without --peft: ``load_model_source`` then takes a vit_t file as fully fine-tuned
    (micro-sam trains vit_t only that way) and refuses any other."""
    from .config import parse_targets
    from .registry import get_method

    if peft is None:
        return None
    get_method(peft)
    if any(t.strip().lower().startswith("dec.") for t in targets.split(",")):
        raise PeftExportError(f"--targets {targets}: micro-sam has no mask-decoder PEFT (its checkpoints hold the "
                              "decoder's own weights); give only encoder targets (q, k, v, mlp)")
    return PeftConfig(
        method=peft,
        blocks=blocks,
        rank=rank,
        targets=parse_targets(targets) if peft in ("lora", "qlora") else ("q", "v"),
        ssf_patch_embed=False,  # micro-sam's patch-embedding SSF branch never fires
        adaptformer_residual=adaptformer_residual,
    )


def import_micro_sam(
    checkpoint: str | Path,
    config: PeftConfig,
    model_type: str | None = None,
    image_size: int | None = None,
) -> AdaptedModel:
    """A micro-sam training checkpoint as an adapted model.

    micro-sam does not record which PEFT method made a checkpoint, so ``config`` says
    it. Its parameter names are ours, so the whole state loads strictly into a model
    with the same method installed; any mismatch means the method/options are wrong.
    """
    obj = read_checkpoint(checkpoint)
    state = sam_state_from_checkpoint(obj, checkpoint)
    decoder = instance_decoder_from_checkpoint(obj, checkpoint)
    found = infer_model_type(state, checkpoint)
    if model_type is not None and found != model_type:
        check_model_type(model_type)
        raise PeftExportError(f"{checkpoint}: checkpoint is {found}, --model {model_type} was asked")
    own_size = checkpoint_image_size(state)
    if image_size is not None and image_size != own_size:
        raise PeftExportError(
            f"{checkpoint}: micro-sam checkpoint is for image size {own_size}; resize after merging instead"
        )
    sam = build_sam_architecture(found, own_size)
    apply_peft(sam, config)
    try:
        load_state_strict(sam, state, checkpoint)
    except PeftExportError as exc:
        raise PeftExportError(
            f"{exc} -- check --peft {config.method} and its options (--rank, --blocks, --targets) match the training"
        ) from None
    base = BaseModelInfo(found, own_size, str(checkpoint), sha256_file(checkpoint))
    return AdaptedModel(sam.eval(), config, base, source=str(checkpoint), instance_decoder=decoder)


def load_model_source(
    adapter: str | Path | None = None,
    micro_sam: str | Path | None = None,
    merged: str | Path | None = None,
    checkpoint: str | Path | None = None,
    micro_sam_config: PeftConfig | None = None,
    model_type: str | None = None,
    image_size: int | None = None,
    force: bool = False,
) -> AdaptedModel:
    """The one way commands get a model: exactly one of adapter / micro_sam / merged."""
    given = [x for x in (adapter, micro_sam, merged) if x is not None]
    if len(given) != 1:
        raise PeftExportError("give exactly one of --adapter, --micro-sam, --merged")
    if adapter is not None:
        return load_adapter(adapter, checkpoint, force=force, image_size=image_size, model_type=model_type)
    if micro_sam is not None:
        if micro_sam_config is None:
            return _fully_finetuned_micro_sam(micro_sam, model_type, image_size)
        return import_micro_sam(micro_sam, micro_sam_config, model_type, image_size)
    sam, base, decoder = load_sam_and_decoder(model_type, merged, image_size)
    return AdaptedModel(sam, None, base, source=str(merged), instance_decoder=decoder)


def _fully_finetuned_micro_sam(checkpoint: str | Path, model_type: str | None, image_size: int | None) -> AdaptedModel:
    """A micro-sam file given without --peft: a vit_t one is fully fine-tuned (micro-sam refuses PEFT
    for vit_t), so its ``model_state`` (+ ``decoder_state``) is the model; any other needs --peft."""
    found = infer_model_type(sam_state_from_checkpoint(read_checkpoint(checkpoint), checkpoint), checkpoint)
    if found != "vit_t":
        raise PeftExportError(
            f"{checkpoint}: micro-sam checkpoints do not record their PEFT method; pass --peft (and --rank, --blocks, ...)"
            " (only vit_t files need none: micro-sam fine-tunes vit_t fully)"
        )
    sam, base, decoder = load_sam_and_decoder(model_type, checkpoint, image_size)
    return AdaptedModel(sam.eval(), None, base, source=str(checkpoint), instance_decoder=decoder)
