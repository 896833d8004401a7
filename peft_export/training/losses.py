"""micro-sam's training loss: Dice (best of the multimask outputs) + MSE of the IoU head."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss_per_mask(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - Dice per (object, mask) as torch_em's dice_score: 2*sum(p*t) / (sum(p^2) + sum(t^2)).

    ``probs`` (N, M, H, W) in [0, 1], ``target`` (N, 1, H, W) binary; returns (N, M).
    """
    inter = (probs * target).sum(dim=(-2, -1))
    denom = (probs * probs).sum(dim=(-2, -1)) + (target * target).sum(dim=(-2, -1))
    return 1.0 - 2.0 * inter / denom.clamp_min(eps)


def full_resolution_logits(low_res: torch.Tensor, image_size: int, input_size: tuple[int, int],
                           original_size: tuple[int, int]) -> torch.Tensor:
    """``Sam.postprocess_masks``: resize to the model input, crop the image's area, resize to the
    label; the last resize is left out when the crop already has the label's size (a bilinear
    resize to the same size is the identity, and at full resolution it costs as much as the first)."""
    masks = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    if tuple(masks.shape[-2:]) != tuple(original_size):
        masks = F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
    return masks


@torch.no_grad()
def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded masks (logit > 0) with the target, (N, M)."""
    pred = logits > 0
    gt = target > 0.5
    inter = (pred & gt).sum(dim=(-2, -1)).float()
    union = (pred | gt).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def sam_loss(mask_logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dice_loss, iou_loss, best) for one prompting iteration.

    ``mask_logits`` (N, M, H, W) at label resolution, ``iou_pred`` (N, M), ``target``
    (N, 1, H, W). The Dice term takes, per object, the best of the M outputs (micro-sam's
    multimask handling); the IoU head regresses the true IoU of every output. ``best``
    (N,) is the index of the best output per object, used to continue prompting.
    """
    mask_logits = mask_logits.float()
    dice = dice_loss_per_mask(torch.sigmoid(mask_logits), target)
    best = dice.detach().argmin(dim=1)
    dice_l = dice.gather(1, best[:, None]).mean()
    iou_l = F.mse_loss(iou_pred.float(), mask_iou(mask_logits, target))
    return dice_l + iou_l, dice_l, iou_l, best
