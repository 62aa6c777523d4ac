"""Tiny untrained multi-sequence packs for tests (fast, deterministic), and synthetic studies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TINY = {"base": 4, "tokens": 2, "mmha_layers": 1, "relation_heads": 1}
TINY_PACK = "tiny-myops"
# an oblique short-axis geometry like MyoPS: 0.73 mm pixels, 12 mm slices, rotated axes
AFFINE = np.array([[0.0, -0.7, 3.0, 10.0], [0.2, 0.0, -11.0, -40.0], [-0.7, 0.0, 3.4, 25.0], [0.0, 0.0, 0.0, 1.0]])


def save_tiny_pack(folder: Path, pack_id: str = TINY_PACK, spacing_mm: float | None = None, augmentation: dict | None = None) -> Path:
    """An untrained small DMAF-Net (base width 4) with the MyoPS classes, saved as a pack folder
    (``augmentation``: the training augmentation its manifest records, which decides the flips of --tta)."""
    from medseg import models
    from medseg.train.multiseq import MYOPS_CLASSES
    from medseg.train.packs import Pack, save_pack

    torch.manual_seed(0)
    model = models.build("dmafnet", in_channels=3, num_classes=len(MYOPS_CLASSES), config="small", **TINY).eval()
    manifest = {"sequences": ["C0", "LGE", "T2"], "overrides": dict(TINY), "spacing_mm": spacing_mm}
    if augmentation is not None:
        manifest["training"] = {"augmentation": augmentation}
    pack = Pack(pack_id, model, "dmafnet", "small", 3, list(MYOPS_CLASSES), manifest=manifest)
    return save_pack(pack, folder / pack_id)


def synthetic_volume(shape=(48, 40, 3), seed=0) -> np.ndarray:
    """A smooth int16 volume (X, Y, Z) with a bright disc, like a slice stack of blood pool."""
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[: shape[0], : shape[1]]
    disc = ((x - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2 < (min(shape[:2]) / 4) ** 2).astype(np.float32)
    vol = np.stack([disc * (800 + 50 * k) for k in range(shape[2])], axis=-1) + rng.normal(200, 30, shape)
    return vol.astype(np.int16)


def write_study(folder: Path, shape=(48, 40, 3), affine=AFFINE, names=("C0", "LGE", "T2")) -> dict[str, Path]:
    from medseg.io.nifti import write_nifti

    folder.mkdir(parents=True, exist_ok=True)
    return {n: write_nifti(folder / f"{n}.nii.gz", synthetic_volume(shape, seed=i), affine) for i, n in enumerate(names)}
