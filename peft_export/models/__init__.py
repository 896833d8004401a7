"""Stage 1, models: build SAM (vit_b / vit_l / vit_h / tiny, and MobileSAM vit_t with our TinyViT encoder;
any image size) and SAM 2.1 (Hiera t / s / b+ / l, from the sam2 package; ``family`` tells them apart),
load checkpoints, micro-sam's
instance decoder (AIS), and an exact rel-pos-folded attention for export and fused kernels.

May import: errors, fsutil (and torch, segment_anything, sam2 lazily).
"""

from .checkpoints import (
    BaseModelInfo,
    checkpoint_image_size,
    decoder_state_from_checkpoint,
    describe_model,
    describe_type,
    infer_model_type,
    instance_decoder_from_checkpoint,
    is_micro_sam_checkpoint,
    load_sam,
    load_sam_and_decoder,
    load_state_strict,
    read_checkpoint,
    resize_positional_state,
    sam_state_from_checkpoint,
)
from .family import build_architecture, encoder_trunk, is_sam2, is_sam2_type, model_image_size, model_parts
from .encoder_split import encode_with_frozen_prefix, first_trainable_block, frozen_trunk, trainable_tail
from .instance_decoder import (
    MAP_NAMES,
    InstanceDecoder,
    decoder_from_state,
    postprocess_maps,
    random_instance_decoder,
)
from .folded_attention import FoldedAttention, folded_attention, folded_rel_pos_attention
from .sam import (
    ARCHITECTURES,
    MODEL_TYPES,
    PATCH_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_EMBED_DIM,
    RANDOM_INIT,
    SamArch,
    build_sam_architecture,
    check_image_size,
    check_model_type,
    random_sam,
    randomize_positional_embeddings,
)

__all__ = [
    "build_architecture", "describe_type", "encoder_trunk", "is_sam2", "is_sam2_type", "model_image_size", "model_parts",
    "ARCHITECTURES", "BaseModelInfo", "FoldedAttention", "folded_attention", "folded_rel_pos_attention", "MODEL_TYPES", "PATCH_SIZE", "PIXEL_MEAN", "PIXEL_STD", "PROMPT_EMBED_DIM",
    "RANDOM_INIT", "SamArch", "build_sam_architecture", "check_image_size", "check_model_type",
    "checkpoint_image_size", "decoder_from_state", "decoder_state_from_checkpoint", "describe_model",
    "InstanceDecoder", "instance_decoder_from_checkpoint", "load_sam_and_decoder", "MAP_NAMES",
    "postprocess_maps", "random_instance_decoder", "infer_model_type", "is_micro_sam_checkpoint", "load_sam",
    "load_state_strict", "random_sam", "randomize_positional_embeddings", "read_checkpoint",
    "resize_positional_state", "sam_state_from_checkpoint",
    "encode_with_frozen_prefix", "first_trainable_block", "frozen_trunk", "trainable_tail",
]
