"""Training loss: cross-entropy + soft Dice over the foreground classes (spec §11.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = False, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over classes, each computed over the whole batch (batch Dice, as nnU-Net).

    ``logits`` ``(N, C, H, W)``; ``target`` ``(N, H, W)`` class indices. Classes absent from both the
    batch target and (softly) the prediction contribute a Dice close to 1, not a spurious 0.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    if not include_background and probs.shape[1] > 1:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1.0 - dice.mean()


class DiceCELoss(nn.Module):
    """``ce_weight`` x cross-entropy + ``dice_weight`` x soft Dice loss (foreground classes)."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, include_background: bool = False) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target.long())
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(logits, target, self.include_background)


__all__ = ["DiceCELoss", "soft_dice_loss"]
