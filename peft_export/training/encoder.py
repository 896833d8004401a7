"""The image encoder in training: SamPredictor-exact preprocessing, and a frozen prefix run without autograd
(the split functions live in ``models.encoder_split``: export splits the encoder the same way)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from ..models.encoder_split import (  # noqa: F401 - re-exported: training's API
    encode_with_frozen_prefix,
    first_trainable_block,
    frozen_trunk,
    trainable_tail,
)


def preprocess_patches(sam: Sam, patches: Sequence[np.ndarray], device: torch.device
                       ) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 HxWx3 patches (same size) to the encoder input, exactly as SamPredictor.set_image.

    ResizeLongestSide.apply_image (PIL on uint8, what inference uses), then sam.preprocess
    (normalise, pad). Returns (B x 3 x S x S, resized (h, w)). ``apply_image_torch`` is not
    used: it differs from apply_image and reads the size from the batch/channel axes.
    """
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    h, w = patches[0].shape[:2]
    size = transform.get_preprocess_shape(h, w, transform.target_length)
    arrs = [p if (h, w) == size else transform.apply_image(p) for p in patches]
    x = torch.from_numpy(np.stack(arrs)).to(device).permute(0, 3, 1, 2).contiguous().float()
    return sam.preprocess(x), size
