"""The training loss: Dice + cross-entropy, and the per-pixel weights at the ends of a structure's long axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.measure.biometry import aop_hsd, long_axis
from medseg.train.losses import DiceCELoss, axis_end_weights


def _bar_and_disc() -> np.ndarray:
    lab = np.zeros((64, 80), np.uint8)
    lab[30:34, 10:51] = 1  # a 4 x 41 bar: its long axis runs between two opposite corners
    yy, xx = np.mgrid[:64, :80]
    lab[(yy - 50) ** 2 + (xx - 40) ** 2 <= 36] = 2
    return lab


def test_long_axis_is_the_pair_the_aop_rule_takes():
    lab = _bar_and_disc()
    ends = long_axis(lab == 1)
    assert ends is not None and set(ends) == set(aop_hsd(lab).ps_points)
    assert {c for _, c in ends} == {10, 50} and {r for r, _ in ends} == {30, 33}
    assert long_axis(np.zeros((8, 8), bool)) is None


def test_axis_end_weights_peak_at_the_two_ends_and_leave_other_maps_alone():
    lab = _bar_and_disc()
    y = torch.from_numpy(np.stack([lab, np.where(lab == 1, 0, lab)]).astype(np.int64))
    w = axis_end_weights(y, 1, weight=5.0, radius=2.0).numpy()
    assert w.shape == (2, 64, 80) and w.dtype == np.float32
    peaks = {tuple(p) for p in np.argwhere(w[0] == w[0].max())}
    assert peaks == set(long_axis(lab == 1)) and w[0].max() == pytest.approx(6.0)
    assert w[0, 5, 5] == pytest.approx(1.0) and w[0, 31, 30] == pytest.approx(1.0)  # far from both ends
    assert w[0, 30, 12] == pytest.approx(1 + 5 * np.exp(-4 / 8), rel=1e-5)  # 2 px from the end (30, 10)
    assert np.all(w[1] == 1.0)  # no class 1 in the second map


def test_weighted_cross_entropy_is_the_weighted_mean_and_equals_plain_with_unit_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 64, 80)
    y = torch.from_numpy(np.stack([_bar_and_disc()] * 2).astype(np.int64))
    loss = DiceCELoss(dice_weight=0.0)
    assert torch.allclose(loss(logits, y, torch.ones(2, 64, 80)), loss(logits, y))
    w = axis_end_weights(y, 1, weight=5.0, radius=2.0)
    per_pixel = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(loss(logits, y, w), (per_pixel * w).sum() / w.sum())
    assert not torch.allclose(loss(logits, y, w), loss(logits, y))
