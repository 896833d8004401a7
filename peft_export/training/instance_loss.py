"""The instance decoder's loss, as micro-sam trains it: torch-em's ``DiceBasedDistanceLoss(mask_distances_in_bg=True)``.

Three Dice losses, summed: foreground map vs foreground target, and the centre- and
boundary-distance maps vs their targets, both multiplied by the foreground target first
(so the background, where the targets are 1, does not count). Dice here is torch-em's
``dice_score`` on soft values: 1 - 2 sum(p t) / max(sum(p^2) + sum(t^2), eps), summed over
the whole batch.
"""

from __future__ import annotations

import torch

EPS = 1e-7  # torch-em's DiceLoss default


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """1 - Dice of two same-shaped tensors (one channel), summed over batch and pixels."""
    numerator = (pred * target).sum()
    denominator = (pred * pred).sum() + (target * target).sum()
    return 1.0 - 2.0 * numerator / denominator.clamp(min=eps)


def distance_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, parts) for maps ``pred`` and targets ``target``, both (B, 3, H, W) in [0, 1]."""
    if pred.shape != target.shape or pred.shape[1] != 3:
        raise ValueError(f"instance maps {tuple(pred.shape)} and targets {tuple(target.shape)} must be (B, 3, H, W)")
    pred, target = pred.float(), target.float()
    fg = target[:, 0:1]
    parts = {
        "foreground": soft_dice_loss(pred[:, 0:1], fg),
        "center_distances": soft_dice_loss(pred[:, 1:2] * fg, target[:, 1:2] * fg),
        "boundary_distances": soft_dice_loss(pred[:, 2:3] * fg, target[:, 2:3] * fg),
    }
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}
