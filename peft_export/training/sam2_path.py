"""The trainer's steps on SAM 2's image path (``SAM2ImagePredictor``'s conventions, in torch with autograd).

Patches are resized to S x S (no aspect ratio kept: SAM2Transforms, antialiased bilinear on the
float image), prompts scale by S / W and S / H, and the low-res logits go back to the label with one
bilinear resize. The encoder runs its frozen Hiera blocks without autograd (the same ops as
``forward_image``, so the same values), and returns the decoder's three image inputs
(``models.sam2.Sam2Features``), which the step treats as one leaf, as SAM's embedding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.sam2 import SAM2_PIXEL_MEAN, SAM2_PIXEL_STD, Sam2Features


def preprocess_sam2_patches(model: torch.nn.Module, patches: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 patches (same size) -> (B, 3, S, S), as SAM2Transforms (ToTensor, Resize, Normalize)."""
    s = int(model.image_size)
    x = torch.from_numpy(np.stack(patches)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if tuple(x.shape[-2:]) != (s, s):
        x = F.interpolate(x, (s, s), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(SAM2_PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(SAM2_PIXEL_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def first_trainable_hiera_block(model: torch.nn.Module) -> int | None:
    """Index of the first Hiera block with a trainable tensor (depth if none); None when the stem trains."""
    trunk = model.image_encoder.trunk
    stem = list(trunk.patch_embed.parameters()) + [trunk.pos_embed, trunk.pos_embed_window]
    if any(p.requires_grad for p in stem):
        return None
    for i, block in enumerate(trunk.blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(trunk.blocks)


def encode_sam2(model: torch.nn.Module, x: torch.Tensor, first_trainable: int | None) -> Sam2Features:
    """``models.sam2.encode_image`` with the stem and the blocks before ``first_trainable`` run without autograd."""
    trunk = model.image_encoder.trunk
    frozen_until = 0 if first_trainable is None else first_trainable
    stage_outputs = []
    with torch.set_grad_enabled(torch.is_grad_enabled() and first_trainable is None):
        h = trunk.patch_embed(x)
        h = h + trunk._get_pos_embed(h.shape[1:3])
    for i, block in enumerate(trunk.blocks):  # Hiera.forward, block by block
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= frozen_until):
            h = block(h)
        if i in trunk.stage_ends:
            stage_outputs.append(h.permute(0, 3, 1, 2))
    features, _ = model.image_encoder.neck(stage_outputs)  # ImageEncoder.forward: scalp drops the last level
    features = features[: len(features) - model.image_encoder.scalp]
    decoder = model.sam_mask_decoder
    high = [decoder.conv_s0(features[0]), decoder.conv_s1(features[1])]
    low = features[-1]
    if model.directly_add_no_mem_embed:
        low = low + model.no_mem_embed.view(1, -1, 1, 1)
    return Sam2Features(low, high)


def features_leaf(feats: Sam2Features) -> Sam2Features:
    """The decoder iterations backpropagate into these leaves; the encoder backward runs once."""
    return Sam2Features(feats.image_embed.detach().requires_grad_(feats.image_embed.requires_grad),
                        [f.detach().requires_grad_(f.requires_grad) for f in feats.high_res_feats])


def backward_features(feats: Sam2Features, leaf: Sam2Features) -> None:
    pairs = [(t, l.grad) for t, l in zip([feats.image_embed, *feats.high_res_feats],
                                         [leaf.image_embed, *leaf.high_res_feats]) if t.requires_grad and l.grad is not None]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def sam2_full_resolution(low_res: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits -> the label's size (SAM2Transforms.postprocess_masks)."""
    return F.interpolate(low_res, tuple(original_size), mode="bilinear", align_corners=False)


class Sam2Frame:
    """ResizeLongestSide's ``apply_coords_torch`` / ``apply_boxes_torch`` for SAM 2's S x S frame."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        from ..models.sam2 import to_model_frame

        return to_model_frame(coords.float(), original_size, self.image_size)

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
