"""SAM's architectures, built from segment_anything's own modules, at any image size.

The architectures are built the way ``build_sam.py`` builds them, plus ``tiny``: the
same structure (windowed + global blocks, neck, prompt encoder, mask decoder) at a
small width, for fast tests and demos, and ``vit_t``: MobileSAM, our TinyViT encoder
(``tiny_vit.py``) with SAM's prompt encoder and mask decoder. Any image size that is a
multiple of 16 works.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ..errors import PeftExportError
from .tiny_vit import TinyViTEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
RANDOM_INIT = "random-init"


@dataclass(frozen=True)
class SamArch:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    default_image_size: int = 1024
    encoder: str = "vit"  # "vit": segment_anything's ImageEncoderViT; "tiny_vit": MobileSAM's TinyViT


ARCHITECTURES: dict[str, SamArch] = {
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
    # Same structure as SAM (windowed and global attention, neck, full prompt
    # encoder and mask decoder), small enough for a CPU test in milliseconds.
    "tiny": SamArch(64, 4, 4, (1, 3), window_size=7, default_image_size=256),
    # MobileSAM: embed dims 64/128/160/320, 10 TinyViT blocks (the MBConv stage is not
    # counted); embed_dim is the last stage's width, num_heads its heads.
    "vit_t": SamArch(320, 10, 10, (), window_size=7, encoder="tiny_vit"),
}
MODEL_TYPES = tuple(ARCHITECTURES)


def check_model_type(model_type: str) -> SamArch:
    if model_type not in ARCHITECTURES:
        raise PeftExportError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    return ARCHITECTURES[model_type]


def check_image_size(image_size: int) -> int:
    if image_size <= 0 or image_size % PATCH_SIZE:
        raise PeftExportError(f"image size {image_size} must be a positive multiple of {PATCH_SIZE}")
    return image_size


def build_sam_architecture(model_type: str, image_size: int | None = None) -> Sam:
    """An uninitialised-from-checkpoint SAM of the given type and image size (PyTorch default init)."""
    arch = check_model_type(model_type)
    image_size = check_image_size(image_size or arch.default_image_size)
    grid = image_size // PATCH_SIZE
    sam = Sam(
        image_encoder=TinyViTEncoder(image_size) if arch.encoder == "tiny_vit" else ImageEncoderViT(
            depth=arch.depth,
            embed_dim=arch.embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.global_attn_indexes,
            window_size=arch.window_size,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def randomize_positional_embeddings(sam: Sam, generator: torch.Generator) -> None:
    """SAM creates ``pos_embed`` and ``rel_pos`` as zeros (TinyViT its ``attention_biases``,
    and BatchNorm statistics of 0 and 1); a random model with those would hide every bug in
    their handling, so give them small random values."""
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if name == "pos_embed" or name.endswith(("rel_pos_h", "rel_pos_w")):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            elif name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            elif name.endswith(".bn.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith(".bn.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        for name, b in sam.image_encoder.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))


def random_sam(model_type: str, image_size: int | None = None, seed: int = 0) -> Sam:
    """A reproducible randomly initialised SAM: the same seed gives bit-identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam_architecture(model_type, image_size)
        randomize_positional_embeddings(sam, torch.Generator().manual_seed(seed + 1))
    return sam
