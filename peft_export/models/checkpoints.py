"""Loading checkpoints of every supported format into a plain SAM (and micro-sam's instance decoder).

Official, merged and micro-sam (``model_state``) checkpoints, always through
``torch.load(weights_only=True)``; the model type is inferred from the weights, and an
image size other than the checkpoint's interpolates the positional embeddings
(``pos_embed`` bicubic, the global blocks' ``rel_pos`` linearly, as SAM's ``get_rel_pos``).
A micro-sam checkpoint's ``decoder_state`` (the AIS decoder) is loaded when present.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from ..errors import PeftExportError
from ..fsutil import sha256_file
from .family import is_sam2_type
from .instance_decoder import InstanceDecoder, decoder_from_state
from .state import load_state_strict
from .sam import (
    ARCHITECTURES,
    PATCH_SIZE,
    RANDOM_INIT,
    build_sam_architecture,
    check_image_size,
    check_model_type,
    random_sam,
)

def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise PeftExportError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every load failure becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise PeftExportError(
                f"{path}: refused to load: the file contains pickled Python objects, not only weights "
                "(loading it could run arbitrary code)"
            ) from None
        raise PeftExportError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise PeftExportError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def is_micro_sam_checkpoint(obj: Mapping) -> bool:
    return "model_state" in obj and isinstance(obj["model_state"], Mapping)


def sam_state_from_checkpoint(obj: Mapping, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The SAM state dict inside an official, merged or micro-sam checkpoint.

    micro-sam stores ``{"model_state": {"sam." + key: tensor}, ...}``; its PEFT keys
    (``attn.qkv.qkv_proj.*`` etc.) are returned as they are, for ``peft.micro_sam`` to map.
    """
    from .sam2 import sam2_state_from_checkpoint

    sam2_state = sam2_state_from_checkpoint(obj, path)
    if sam2_state is not None:  # sam2's {"model": state} (or a plain SAM 2 state dict)
        return sam2_state
    if is_micro_sam_checkpoint(obj):
        model_state = obj["model_state"]
        state = {k[len("sam.") :]: v for k, v in model_state.items() if k.startswith("sam.")}
        if not state and any(k.startswith("image_encoder.") for k in model_state):
            state = dict(model_state)  # exported micro-sam models keep SAM's keys without the prefix
        if not state:
            raise PeftExportError(f"{path}: micro-sam checkpoint has no 'sam.*' keys in model_state")
    else:
        state = dict(obj)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PeftExportError(f"{path}: entry {bad[0]!r} is not a tensor; not a SAM state dict")
    if not any(k.startswith("image_encoder.") for k in state):
        raise PeftExportError(f"{path}: no 'image_encoder.*' weights; not a SAM checkpoint")
    return state


def decoder_state_from_checkpoint(obj: Mapping, path: str | Path = "checkpoint") -> dict[str, torch.Tensor] | None:
    """micro-sam's instance-decoder weights (``decoder_state``) of a checkpoint, or None without them."""
    state = obj.get("decoder_state") if isinstance(obj, Mapping) else None
    if state is None or (isinstance(state, Mapping) and not state):  # an empty one: no decoder
        return None
    if not isinstance(state, Mapping):
        raise PeftExportError(f"{path}: decoder_state is not a dict of tensors")
    return dict(state)


def instance_decoder_from_checkpoint(obj: Mapping, path: str | Path = "checkpoint") -> InstanceDecoder | None:
    state = decoder_state_from_checkpoint(obj, path)
    return None if state is None else decoder_from_state(state, str(path))


TINY_VIT_KEY = "image_encoder.patch_embed.seq.0.c.weight"  # MobileSAM's first ConvBN


def infer_model_type(state: Mapping[str, torch.Tensor], path: str | Path = "checkpoint") -> str:
    """Model type from the encoder width and depth of a state dict (SAM 2: Hiera's)."""
    from .sam2 import infer_sam2_type, is_sam2_state

    if is_sam2_state(state):
        return infer_sam2_type(state, path)
    if TINY_VIT_KEY in state:
        return "vit_t"
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        key = "image_encoder.patch_embed.proj.layer.weight"  # SSF-wrapped (micro-sam layout)
    if key not in state:
        raise PeftExportError(f"{path}: missing image_encoder.patch_embed.proj.weight; not a SAM checkpoint")
    dim = state[key].shape[0]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
    for name, arch in ARCHITECTURES.items():
        if arch.embed_dim == dim and arch.depth == depth:
            return name
    raise PeftExportError(f"{path}: unknown SAM encoder ({dim}-dim, {depth} blocks)")


def describe_type(model_type: str) -> str:
    """``vit_b (SAM, 768-dim)``, ``sam2.1_hiera_t (SAM 2, Hiera 96-dim, 12 blocks)``: for mismatch errors."""
    if is_sam2_type(model_type):
        from .sam2 import describe_sam2_type

        return f"{model_type} ({describe_sam2_type(model_type)})"
    arch = ARCHITECTURES[model_type]
    return f"{model_type} (SAM, {arch.embed_dim}-dim)"


def checkpoint_image_size(state: Mapping[str, torch.Tensor]) -> int:
    """The image size a checkpoint was trained at (TinyViT has no positional embedding: 1024, MobileSAM's;
    SAM 2 interpolates Hiera's: its default 1024)."""
    from .sam2 import SAM2_DEFAULT_IMAGE_SIZE, is_sam2_state

    if is_sam2_state(state):
        return SAM2_DEFAULT_IMAGE_SIZE
    if "image_encoder.pos_embed" not in state:
        return ARCHITECTURES["vit_t"].default_image_size
    return state["image_encoder.pos_embed"].shape[1] * PATCH_SIZE


def resize_positional_state(
    state: Mapping[str, torch.Tensor], model_type: str, image_size: int
) -> dict[str, torch.Tensor]:
    """Interpolate ``pos_embed`` (bicubic) and the global blocks' ``rel_pos`` (linear, as
    segment_anything's ``get_rel_pos`` does) to the grid of ``image_size``."""
    arch = ARCHITECTURES[model_type]
    grid = image_size // PATCH_SIZE
    state = dict(state)
    if arch.encoder == "tiny_vit":  # no positional weights: window biases depend on the window only
        return state
    pos = state["image_encoder.pos_embed"]
    if pos.shape[1] == grid:
        return state
    pos = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic", align_corners=False)
    state["image_encoder.pos_embed"] = pos.permute(0, 2, 3, 1).contiguous()
    for i in arch.global_attn_indexes:
        for axis in ("h", "w"):
            for key in (f"image_encoder.blocks.{i}.attn.rel_pos_{axis}",):
                rel = state[key].float()
                rel = F.interpolate(rel.t()[None], size=2 * grid - 1, mode="linear", align_corners=False)
                state[key] = rel[0].t().contiguous()
    return state


@dataclass
class BaseModelInfo:
    """Where a model's base weights came from: recorded in adapters and manifests."""

    model_type: str
    image_size: int
    checkpoint: str | None  # path as given, or None for random init
    sha256: str  # of the checkpoint file, or "random-init"
    seed: int = 0  # random-init seed (only meaningful without checkpoint)

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "image_size": self.image_size,
            "checkpoint": self.checkpoint,
            "sha256": self.sha256,
            "seed": self.seed,
        }


def load_sam(
    model_type: str | None,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    warn_random: bool = True,
) -> tuple[Sam, BaseModelInfo]:
    """Build a plain SAM from an official / merged / plain micro-sam checkpoint, or at random.

    ``model_type=None`` infers the type from the checkpoint. A checkpoint of another
    type than the one asked for is refused by name. ``image_size`` other than the
    checkpoint's interpolates the positional embeddings.
    """
    sam, info, _ = load_sam_and_decoder(model_type, checkpoint, image_size, seed, warn_random)
    return sam, info


def load_sam_and_decoder(
    model_type: str | None,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    warn_random: bool = True,
) -> tuple[Sam, BaseModelInfo, InstanceDecoder | None]:
    """``load_sam`` plus the checkpoint's instance decoder (micro-sam ``decoder_state``), or None."""
    if checkpoint is None:
        if model_type is None:
            raise PeftExportError("--model is required when no checkpoint is given")
        if is_sam2_type(model_type):
            return (*_random_sam2(model_type, image_size, seed, warn_random), None)
        arch = check_model_type(model_type)
        if warn_random:
            warnings.warn(
                f"no checkpoint given: {model_type} is randomly initialised (seed {seed}); "
                "results are only good for testing the pipeline",
                stacklevel=2,
            )
        image_size = image_size or arch.default_image_size
        return (random_sam(model_type, image_size, seed), BaseModelInfo(model_type, image_size, None, RANDOM_INIT, seed),
                None)

    obj = read_checkpoint(checkpoint)
    state = sam_state_from_checkpoint(obj, checkpoint)
    decoder = instance_decoder_from_checkpoint(obj, checkpoint)
    del obj
    found = infer_model_type(state, checkpoint)
    if model_type is not None and found != model_type:
        raise PeftExportError(f"{checkpoint}: checkpoint is {describe_type(found)}, --model {model_type} was asked")
    if is_sam2_type(found):
        from .sam2 import load_sam2_state

        model = load_sam2_state(state, found, image_size, checkpoint)  # a merged AIS run: {"model", "decoder_state"}
        return model, BaseModelInfo(found, int(model.image_size), str(checkpoint), sha256_file(checkpoint)), decoder
    peft_keys = [k for k in state if ".qkv_proj." in k or ".mlp_layer." in k or ".layer." in k or ".mlp_proj." in k]
    if peft_keys:
        raise PeftExportError(
            f"{checkpoint}: contains PEFT layers ({peft_keys[0]}); import it with --micro-sam and --peft METHOD"
        )
    image_size = check_image_size(image_size or checkpoint_image_size(state))
    sam = build_sam_architecture(found, image_size)
    state = resize_positional_state(state, found, image_size)
    load_state_strict(sam, state, checkpoint)
    return sam, BaseModelInfo(found, image_size, str(checkpoint), sha256_file(checkpoint)), decoder


def _random_sam2(model_type: str, image_size: int | None, seed: int, warn_random: bool):
    from .sam2 import random_sam2

    if warn_random:
        warnings.warn(f"no checkpoint given: {model_type} is randomly initialised (seed {seed}); "
                      "results are only good for testing the pipeline", stacklevel=3)
    model = random_sam2(model_type, image_size, seed)
    return model, BaseModelInfo(model_type, int(model.image_size), None, RANDOM_INIT, seed)


def describe_model(sam: Sam) -> str:
    from .family import is_sam2

    if is_sam2(sam):
        trunk = sam.image_encoder.trunk
        return f"SAM 2 Hiera, {len(trunk.blocks)} blocks, {trunk.patch_embed.proj.out_channels}-dim, image size {sam.image_size}"
    enc = sam.image_encoder
    if not hasattr(enc, "patch_embed") or not hasattr(enc.patch_embed, "proj"):
        return f"TinyViT, {len(enc.blocks)} blocks, image size {enc.img_size}"
    return f"{len(enc.blocks)} blocks, {enc.patch_embed.proj.out_channels}-dim, image size {enc.img_size}"
