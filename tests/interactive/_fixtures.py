"""Synthetic images of separate bright disks and a deterministic "network" that finds bright pixels,
so the click logic is tested on known objects without depending on trained weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medseg.train.packs import Pack, default_classes

DISKS = [(40, 40, 14), (40, 100, 12), (100, 70, 16)]  # (row, col, radius)


def disk_image(shape=(140, 150), disks=DISKS) -> tuple[np.ndarray, np.ndarray]:
    """A grey uint8 image with bright disks on a dark, slightly noisy background, and their instance ids."""
    rng = np.random.default_rng(0)
    img = rng.normal(30, 3, shape)
    ids = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i, (r, c, rad) in enumerate(disks, start=1):
        inside = (yy - r) ** 2 + (xx - c) ** 2 <= rad**2
        img[inside] = 200 + rng.normal(0, 3, int(inside.sum()))
        ids[inside] = i
    return np.clip(img, 0, 255).astype(np.uint8), ids


class BrightNet(nn.Module):
    """Two-class scores: bright (z-scored intensity above 0.5) is class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 8.0 * (x[:, :1] - 0.5)
        return torch.cat([-s, s], dim=1)


def bright_pack() -> Pack:
    return Pack("bright", BrightNet().eval(), "unet", "small", 1, default_classes(2, ["background", "blob"]), tile=64)


class EchoNet(nn.Module):
    """A click-guided "network" that answers its previous-mask channel (image, +, -, previous)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 8.0 * (x[:, 3:4] - 0.5)
        return torch.cat([-s, s], dim=1)


def echo_pack(manifest: dict | None = None) -> Pack:
    from medseg.interactive.clicks import DISKS as ENCODING

    return Pack("echo-click", EchoNet().eval(), "unet", "small", 1, default_classes(2, ["background", "object"]), tile=64,
                interactive=True, manifest={"kind": "interactive", "click_encoding": ENCODING, **(manifest or {})})
