"""Each paper network learns: a tiny training run on a few real PSFHS frames lowers the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from imageio import v3 as iio

from medseg import models
from medseg.train.losses import DiceCELoss
from tests.conftest import data_dir

PAPER_NETWORKS = ["dcaunet", "tcsaformer", "medformer", "mslaunet"]


@pytest.fixture(scope="module")
def frames():
    root = data_dir("psfhs")
    import csv

    with open(root / "frames.csv", newline="") as fh:
        train = [r["id"] for r in csv.DictReader(fh) if r["split"] == "train" and r["shipped"] == "1"]
    files = [root / "images" / f"{i}.png" for i in train[::110][:4]]  # four training frames far apart
    images = np.stack([iio.imread(f) for f in files]).astype(np.float32)
    labels = np.stack([iio.imread(root / "labels" / f.name) for f in files]).astype(np.int64)
    x = torch.from_numpy((images - images.mean()) / images.std())[:, None]
    y = torch.from_numpy(labels)
    # 96 x 96: small enough for a few CPU steps, large enough to keep the symphysis
    return F.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False), F.interpolate(y[:, None].float(), size=(96, 96), mode="nearest")[:, 0].long()


@pytest.mark.parametrize("name", PAPER_NETWORKS)
def test_tiny_run_on_real_frames_lowers_the_loss(name, frames):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = frames
        net = models.build(name, in_channels=1, num_classes=3, config="small").train()
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        loss_fn = DiceCELoss()
        losses = []
        for _ in range(12):
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert np.isfinite(losses).all()
        assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
    finally:
        torch.set_num_threads(threads)
