"""Training loss: cross-entropy + soft Dice over the foreground classes (spec §11.6), with optional
per-pixel cross-entropy weights (:func:`axis_end_weights`: the ends of a structure's long axis)."""

from __future__ import annotations

import numpy as np
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


def axis_end_weights(target: torch.Tensor, value: int, weight: float, radius: float) -> torch.Tensor:
    """Per-pixel cross-entropy weights ``1 + weight * g``: ``g`` a Gaussian bump (sigma ``radius`` px, peak 1) at
    each end of the long axis of class ``value`` in every target map (the farthest pair of its contour points,
    as the AoP rule takes it, :func:`medseg.measure.biometry.long_axis`). Maps without the class get weight 1.

    Measurements such as the angle of progression hinge on where a thin structure's axis ends; a pixel's worth
    of outline there moves the axis by a degree, while Dice hardly notices it.
    """
    from medseg.measure.biometry import long_axis

    y = target.detach().cpu().numpy()
    n, h, w = y.shape
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    out = np.ones((n, h, w), dtype=np.float32)
    for k in range(n):
        ends = long_axis(y[k] == value)
        if ends is None:
            continue
        bump = np.zeros((h, w), dtype=np.float32)
        for r, c in ends:
            np.maximum(bump, np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2.0 * radius**2)), out=bump)
        out[k] += weight * bump
    return torch.from_numpy(out).to(target.device)


class DiceCELoss(nn.Module):
    """``ce_weight`` x cross-entropy + ``dice_weight`` x soft Dice loss (foreground classes).

    ``pixel_weight`` ``(N, H, W)`` turns the cross-entropy into a weighted mean over pixels.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, include_background: bool = False) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor, pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
        if pixel_weight is None:
            ce = F.cross_entropy(logits.float(), target.long())
        else:
            per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none")
            ce = (per_pixel * pixel_weight).sum() / pixel_weight.sum()
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(logits, target, self.include_background)


__all__ = ["DiceCELoss", "axis_end_weights", "soft_dice_loss"]
