"""Whole-slide test material: pyramidal TIFFs written from real glomerulus tiles, and an oracle model.

The mosaic puts real HuBMAP PAS tiles (``data/glomeruli``, halved to 1.7 µm/px) on blank glass with
gaps between them, and knows its glomerulus mask. The mask is also hidden in the least significant
bit of the blue channel of level 0 (lossless zlib TIFF), so :class:`LsbOracle` — a pointwise "model"
that reads that bit — segments the slide perfectly: any shift, seam or mix-up in tiling, blending,
level choice or writing shows up as a difference from the reference.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.conftest import data_dir

TILE_MPP = 0.85 * 2  # HuBMAP tiles are ~0.85 µm/px; the mosaic halves them
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@lru_cache(maxsize=8)
def _mosaic(rows: int, cols: int, tile: int, gap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import imageio.v3 as iio

    root = data_dir("glomeruli")
    with open(root / "tiles.csv", newline="") as fh:
        names = [r["name"] for r in csv.DictReader(fh) if r["name"].startswith("hubmap_ccf") and int(r["n_components"]) >= 1]
    rng = np.random.default_rng(seed)
    chosen = [names[i] for i in rng.choice(len(names), rows * cols, replace=False)]
    h, w = rows * tile + (rows + 1) * gap, cols * tile + (cols + 1) * gap
    img = np.clip(rng.normal(240, 2, (h, w, 3)), 0, 255).astype(np.uint8)
    ref = np.zeros((h, w), np.uint8)
    for i, name in enumerate(chosen):
        r, c = divmod(i, cols)
        a = iio.imread(root / "images" / f"{name}.jpg")
        m = iio.imread(root / "masks" / f"{name}.png")
        f = a.shape[0] // tile
        a = a[: tile * f, : tile * f].reshape(tile, f, tile, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        y, x = gap + r * (tile + gap), gap + c * (tile + gap)
        img[y : y + tile, x : x + tile] = a
        ref[y : y + tile, x : x + tile] = m[: tile * f : f, : tile * f : f] > 0
    img[..., 2] = (img[..., 2] & 0xFE) | ref  # the oracle's channel
    return img, ref


def glomeruli_mosaic(rows: int = 2, cols: int = 3, tile: int = 256, gap: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, binary glomerulus mask) of a mosaic of real tiles on glass; sizes are multiples of 4
    for the defaults, so the 2x and 4x pyramid levels have exact integer downsamples."""
    img, ref = _mosaic(rows, cols, tile, gap, seed)
    return img.copy(), ref.copy()


def write_mosaic_slide(folder: Path, name: str = "mosaic.tif", subifds: bool = False, oracle_levels: bool = False, **kwargs) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write the mosaic as a 3-level pyramidal TIFF at 1.7 µm/px; returns (path, image, mask).

    With ``oracle_levels`` the reduced levels carry the mask (subsampled by 2 and 4) in their blue
    bit too, so the oracle is exact at every level.
    """
    from medseg.io.slides import write_pyramid

    img, ref = glomeruli_mosaic(**kwargs)
    levels = img
    if oracle_levels:
        levels = [img]
        for f in (2, 4):
            h, w = img.shape[0] // f, img.shape[1] // f
            lv = img[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)
            lv[..., 2] = (lv[..., 2] & 0xFE) | ref[::f, ::f][:h, :w]
            levels.append(lv)
    path = write_pyramid(Path(folder) / name, levels, mpp=TILE_MPP, levels=3, subifds=subifds)
    return path, img, ref


class LsbOracle(nn.Module):
    """Reads the glomerulus bit hidden in the blue channel: logits (background, glomerulus)."""

    def __init__(self, mean=IMAGENET[0], std=IMAGENET[1]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.round((x * self.std + self.mean) * 255.0)[:, 2]
        bit = torch.remainder(v, 2.0)
        return torch.stack([1.0 - bit, bit], dim=1) * 12.0 - 6.0


def oracle_pack(mpp: float = TILE_MPP, tile: int = 128, overlap: float = 0.25):
    from medseg.normalise import Normaliser
    from medseg.train.packs import ClassInfo, Pack

    return Pack(
        id="lsb-oracle",
        model=LsbOracle().eval(),
        architecture="test-oracle",
        config="-",
        in_channels=3,
        classes=[ClassInfo(0, "background", "#000000"), ClassInfo(1, "glomerulus", "#00ff00")],
        normaliser=Normaliser("fixed", *IMAGENET),
        mpp=mpp,
        tile=tile,
        overlap=overlap,
        trained=False,
    )


def unet_rgb_pack(mpp: float = TILE_MPP, tile: int = 64, seed: int = 0, balance_on: np.ndarray | None = None):
    """An untrained small RGB U-Net with fixed ImageNet normalisation (as a pathology pack has).

    With ``balance_on`` (an RGB image) the last layer's bias is shifted so that about half of that
    image's pixels go to each class: an untrained network otherwise predicts one class everywhere,
    and label comparisons would be trivially equal.
    """
    from medseg.normalise import Normaliser
    from medseg.train.packs import untrained_pack

    torch.manual_seed(seed)
    pack = untrained_pack("unet", in_channels=3, num_classes=2, mpp=mpp, tile=tile, normaliser=Normaliser("fixed", *IMAGENET))
    pack.id = "test-unet-rgb"
    if balance_on is not None:
        last = [m for m in pack.model.modules() if isinstance(m, nn.Conv2d)][-1]
        x = torch.from_numpy(pack.normaliser.apply(balance_on[:tile, :tile], (0.0, 1.0)))[None]
        with torch.inference_mode():
            logits = pack.model(x)[0]
            last.bias[1] -= float(torch.median(logits[1] - logits[0]))
    return pack
