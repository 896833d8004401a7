"""SAM 2.1 (Hiera tiny / small / base+ / large) from the ``sam2`` package's own modules and configs.

Models are built by ``sam2.build_sam.build_sam2`` from ``configs/sam2.1/<model_type>.yaml``
inside the package (with sam2's post-processing: the decoder's dynamic multimask fallback),
at any image size that is a multiple of 32 (the state dict does not depend on it: Hiera
interpolates its positional embedding). Checkpoints are sam2's ``{"model": state_dict}``
(``sam2.1_hiera_*.pt``), loaded strictly; ours are written the same way, so ``build_sam2``
loads a merged file as it loads Meta's.

The torch image path (``encode_image`` / ``decode``) is ``SAM2ImagePredictor``'s: features
of ``forward_image`` with ``no_mem_embed`` added to the lowest-resolution level, prompts as
points (a box is two corner points with labels 2 and 3, first), the decoder on the image
embedding plus the two high-resolution maps. Merge probes, training and export references use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..errors import PeftExportError
from .state import load_state_strict

# (trunk embed dim, number of Hiera blocks) of each SAM 2.1 config: how a checkpoint's type is read.
SAM2_ARCHITECTURES: dict[str, tuple[int, int]] = {
    "sam2.1_hiera_t": (96, 12),
    "sam2.1_hiera_s": (96, 16),
    "sam2.1_hiera_b+": (112, 24),
    "sam2.1_hiera_l": (144, 48),
}
SAM2_MODEL_TYPES = tuple(SAM2_ARCHITECTURES)
SAM2_DEFAULT_IMAGE_SIZE = 1024
SAM2_SIZE_MULTIPLE = 32  # Hiera's last stage is at stride 32; the FPN doubles it back exactly
SAM2_TRUNK_KEY = "image_encoder.trunk.patch_embed.proj.weight"
# SAM2Transforms: ToTensor (/255), Resize((S, S)) (bilinear, antialias), Normalize(ImageNet mean, std)
SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)


def sam2_config_name(model_type: str) -> str:
    check_sam2_type(model_type)
    return f"configs/sam2.1/{model_type}.yaml"


def check_sam2_type(model_type: str) -> None:
    if model_type not in SAM2_ARCHITECTURES:
        raise PeftExportError(f"unknown SAM 2 model {model_type!r}; choose one of {', '.join(SAM2_MODEL_TYPES)}")


def check_sam2_image_size(image_size: int) -> int:
    if image_size <= 0 or image_size % SAM2_SIZE_MULTIPLE:
        raise PeftExportError(f"image size {image_size}: SAM 2 needs a positive multiple of {SAM2_SIZE_MULTIPLE}")
    return image_size


def require_sam2() -> None:
    try:
        import sam2  # noqa: F401
    except ImportError:
        raise PeftExportError("SAM 2 models need the sam2 package: SAM2_BUILD_CUDA=0 pip install "
                              "--no-build-isolation 'peftexport[sam2]' (see docs/sam2.md)") from None


def sam2_overrides(image_size: int) -> list[str]:
    """Hydra overrides of the packaged config for another image size (memory attention's RoPE grid too)."""
    if image_size == SAM2_DEFAULT_IMAGE_SIZE:
        return []
    g = image_size // 16
    return [f"++model.image_size={image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{g},{g}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{g},{g}]"]


def build_sam2_model(model_type: str, image_size: int | None = None, checkpoint: str | Path | None = None,
                     device: str = "cpu") -> torch.nn.Module:
    """``sam2.build_sam.build_sam2`` on the packaged SAM 2.1 config at ``image_size`` (eval mode)."""
    require_sam2()
    from sam2.build_sam import build_sam2

    size = check_sam2_image_size(image_size or SAM2_DEFAULT_IMAGE_SIZE)
    return build_sam2(sam2_config_name(model_type), None if checkpoint is None else str(checkpoint), device=device,
                      hydra_overrides_extra=sam2_overrides(size))


def random_sam2(model_type: str, image_size: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A reproducible random SAM 2: the same seed gives bit-identical weights. Hiera's positional
    embeddings start at zero in sam2; they get small random values so a bug in their handling shows."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2_model(model_type, image_size)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in (model.image_encoder.trunk.pos_embed, model.image_encoder.trunk.pos_embed_window):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def is_sam2_state(state: Mapping) -> bool:
    return SAM2_TRUNK_KEY in state


def sam2_state_from_checkpoint(obj: Mapping, path: str | Path = "checkpoint") -> dict[str, torch.Tensor] | None:
    """The SAM 2 state dict of a ``{"model": state}`` file or a plain state dict; None when it is not SAM 2."""
    state = obj.get("model") if isinstance(obj.get("model"), Mapping) else obj
    if not is_sam2_state(state):
        return None
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PeftExportError(f"{path}: entry {bad[0]!r} is not a tensor; not a SAM 2 state dict")
    return dict(state)


def infer_sam2_type(state: Mapping[str, torch.Tensor], path: str | Path = "checkpoint") -> str:
    """The SAM 2.1 model type of a state dict, from Hiera's width and depth."""
    dim = int(state[SAM2_TRUNK_KEY].shape[0])
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("image_encoder.trunk.blocks."))
    for name, arch in SAM2_ARCHITECTURES.items():
        if arch == (dim, depth):
            return name
    raise PeftExportError(f"{path}: unknown SAM 2 image encoder (Hiera {dim}-dim, {depth} blocks)")


def describe_sam2_type(model_type: str) -> str:
    dim, depth = SAM2_ARCHITECTURES[model_type]
    return f"SAM 2, Hiera {dim}-dim, {depth} blocks"


def load_sam2_state(state: Mapping[str, torch.Tensor], model_type: str, image_size: int | None,
                    path: str | Path) -> torch.nn.Module:
    """A SAM 2 model of ``model_type`` holding ``state`` (strict: every key, every shape)."""
    model = build_sam2_model(model_type, image_size)
    load_state_strict(model, state, path)
    return model.eval()


# ---- the image path in torch (SAM2ImagePredictor's) -----------------------------------------------


@dataclass
class Sam2Features:
    """One encoded batch: ``image_embed`` (B, 256, g, g) with ``no_mem_embed`` added, and the two
    high-resolution maps after the decoder's ``conv_s0`` / ``conv_s1``: (B, 32, 4g, 4g), (B, 64, 2g, 2g)."""

    image_embed: torch.Tensor
    high_res_feats: list[torch.Tensor]

    def select(self, index: int) -> "Sam2Features":
        return Sam2Features(self.image_embed[index : index + 1], [f[index : index + 1] for f in self.high_res_feats])


def backbone_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(lowest-resolution FPN features BEFORE no_mem_embed (B, 256, g, g), [high-res maps after conv_s0/s1])."""
    out = model.forward_image(x)
    fpn = out["backbone_fpn"][-model.num_feature_levels :]
    return fpn[-1], list(fpn[:-1])


def compile_image_encoder(model: torch.nn.Module, **options) -> torch.nn.Module:
    """``torch.compile`` the image encoder (Hiera + FPN) in place; returns the eager one (to put back).

    One eager run at the model's size comes first: sam2's sine position encoding keeps its tensor per feature
    size in a dict that the compiled graph guards on, so with the dict still empty the second compiled call
    would compile again (seen as an 18 s second call of hiera_t at 64 px on the CPU)."""
    weight = next(model.image_encoder.parameters())
    size = int(model.image_size)
    with torch.no_grad():
        model.image_encoder(torch.zeros(1, 3, size, size, device=weight.device, dtype=weight.dtype))
    eager = model.image_encoder
    model.image_encoder = torch.compile(eager, **options)
    return eager


def encode_image(model: torch.nn.Module, x: torch.Tensor) -> Sam2Features:
    """Normalised (B, 3, S, S) images -> the decoder's inputs, as SAM2ImagePredictor.set_image."""
    low, high = backbone_features(model, x)
    if model.directly_add_no_mem_embed:
        low = low + model.no_mem_embed.view(1, -1, 1, 1)
    return Sam2Features(low, high)


def prompt_points(coords: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SAM2ImagePredictor's prompt layout: box corners (labels 2, 3) first, then the points."""
    if boxes is None:
        return None if coords is None else (coords, labels)
    box_coords = boxes.reshape(-1, 2, 2)
    box_labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).repeat(len(box_coords), 1)
    if coords is None:
        return box_coords, box_labels
    return torch.cat([box_coords, coords], dim=1), torch.cat([box_labels, labels.to(box_labels.dtype)], dim=1)


def decode(model: torch.nn.Module, feats: Sam2Features, coords: torch.Tensor | None, labels: torch.Tensor | None,
           boxes: torch.Tensor | None, mask_input: torch.Tensor | None, multimask: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """K prompts on one image (coordinates in the S x S model frame) -> low-res logits (K, C, 4g, 4g),
    IoU (K, C): C = 3 with ``multimask`` else 1 (sam2's stability fallback in eval mode).

    A bf16 / fp16 model: sam2's prompt encoder makes float32 coordinates, so it runs under autocast
    and the decoder in the model's own dtype (CPU autocast refuses LayerNorms with 16-bit weights)."""
    points = prompt_points(coords, labels, boxes)
    dtype = model.sam_mask_decoder.iou_token.weight.dtype
    half = dtype in (torch.bfloat16, torch.float16)
    device = model.sam_mask_decoder.iou_token.weight.device
    with torch.autocast(device.type, dtype=dtype, enabled=half):
        sparse, dense = model.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        image_pe = model.sam_prompt_encoder.get_dense_pe()
    if not half:
        low, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=feats.image_embed, image_pe=image_pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask,
            repeat_image=sparse.shape[0] > 1 and feats.image_embed.shape[0] == 1, high_res_features=feats.high_res_feats)
        return low, iou
    with torch.autocast(device.type, enabled=False):  # sam2's FPN gives float32 even from 16-bit weights
        low, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=feats.image_embed.to(dtype), image_pe=image_pe.to(dtype),
            sparse_prompt_embeddings=sparse.to(dtype), dense_prompt_embeddings=dense.to(dtype),
            multimask_output=multimask, repeat_image=sparse.shape[0] > 1 and feats.image_embed.shape[0] == 1,
            high_res_features=[f.to(dtype) for f in feats.high_res_feats])
    return low, iou


def to_model_frame(xy: torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """(..., 2) x, y pixels of an (H, W) image -> the S x S frame (SAM2Transforms.transform_coords)."""
    h, w = original_size
    return xy / torch.tensor([w, h], dtype=xy.dtype, device=xy.device) * image_size  # sam2's order of operations


def sam2_predictor(model: torch.nn.Module):
    """``SAM2ImagePredictor`` of ``model`` at its own image size (the predictor assumes 1024's feature sizes)."""
    import warnings

    from sam2.sam2_image_predictor import SAM2ImagePredictor

    with warnings.catch_warnings():  # its transforms use torch.jit.script, which torch 2.14 calls deprecated
        warnings.simplefilter("ignore", FutureWarning)
        predictor = SAM2ImagePredictor(model)
    g = int(model.image_size) // 16
    predictor._bb_feat_sizes = [(4 * g, 4 * g), (2 * g, 2 * g), (g, g)]
    return predictor
