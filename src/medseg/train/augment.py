"""Training augmentations that produce images the modality can show (spec §11.6).

One random affine warp (crop position, multi-scale zoom, rotation, flips) is applied to image and
mask together in a single interpolation at the crop size, followed by intensity changes on the image
only. Everything draws from a ``numpy.random.Generator`` handed in by the caller, so a sample is a
pure function of its seed (exact resume, any number of loader workers).

Per modality (see :func:`for_modality`):

- **ultrasound** keeps its orientation: no vertical or horizontal flips (the AoP rule depends on
  left/right), small rotations (±10°), mild zoom, brightness/contrast/gamma and speckle-like noise;
- **endoscopy** tolerates flips and 90° rotations, plus colour jitter;
- **pathology** tolerates flips and any rotation, plus HED stain jitter (Tellez et al. 2018).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    """What may change in a training crop; every field has a neutral value (no change)."""

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    rotate_deg: float = 0.0  # uniform in [-rotate_deg, rotate_deg]
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range (log-uniform); > 1 magnifies
    foreground_crop: float = 0.0  # probability of centring the crop on a foreground pixel
    brightness: float = 0.0  # additive, fraction of the intensity range
    contrast: float = 0.0  # multiplicative around the crop mean
    gamma: float = 0.0  # log-uniform gamma in [exp(-g), exp(g)]
    noise: float = 0.0  # Gaussian noise sigma, fraction of the intensity range
    saturation: float = 0.0  # RGB: blend with grey
    hed: float = 0.0  # RGB pathology: HED stain jitter strength
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "AugmentConfig":
        d = dict(d or {})
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d)


NONE = AugmentConfig()

MODALITIES: dict[str, AugmentConfig] = {
    "ultrasound": AugmentConfig(rotate_deg=10.0, scale=(0.85, 1.15), brightness=0.08, contrast=0.15, gamma=0.2, noise=0.02),
    "endoscopy": AugmentConfig(hflip=True, vflip=True, rot90=True, rotate_deg=20.0, scale=(0.75, 1.33), foreground_crop=0.3, brightness=0.08, contrast=0.15, gamma=0.15, saturation=0.15),
    "pathology": AugmentConfig(hflip=True, vflip=True, rot90=True, rotate_deg=180.0, scale=(0.8, 1.25), foreground_crop=0.5, brightness=0.05, contrast=0.1, saturation=0.1, hed=0.04),
    "none": NONE,
}


def for_modality(modality: str) -> AugmentConfig:
    return MODALITIES.get(modality, MODALITIES["none"])


# --------------------------------------------------------------------------- geometry
def _affine(cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """2x2 matrix mapping crop offsets (from the crop centre) to image offsets, in (row, col)."""
    zoom = math.exp(rng.uniform(math.log(cfg.scale[0]), math.log(cfg.scale[1]))) if cfg.scale[0] != cfg.scale[1] else cfg.scale[0]
    angle = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)) if cfg.rotate_deg else 0.0
    k = int(rng.integers(4)) if cfg.rot90 else 0
    fr = -1.0 if cfg.vflip and rng.random() < 0.5 else 1.0
    fc = -1.0 if cfg.hflip and rng.random() < 0.5 else 1.0
    c, s = math.cos(angle + k * math.pi / 2), math.sin(angle + k * math.pi / 2)
    rot = np.array([[c, -s], [s, c]])
    return rot @ np.diag([fr, fc]) / zoom


def _centre(mask: np.ndarray, shape: tuple[int, int], half_extent: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Crop centre in image coordinates: on a foreground pixel sometimes, else anywhere the crop fits."""
    h, w = shape
    if cfg.foreground_crop and rng.random() < cfg.foreground_crop:
        fg = np.flatnonzero(mask.ravel() > 0)
        if fg.size:
            r, c = divmod(int(fg[rng.integers(fg.size)]), w)
            jitter = rng.uniform(-0.25, 0.25, 2) * half_extent
            return np.array([r, c], float) + jitter
    centre = []
    for n, half in zip((h, w), half_extent):
        lo, hi = half - 0.5, n - half - 0.5
        centre.append(rng.uniform(lo, hi) if hi > lo else (n - 1) / 2.0 + rng.uniform(-0.5, 0.5) * (lo - hi) * 0.5)
    return np.asarray(centre)


def random_crop(image: np.ndarray, mask: np.ndarray, crop: int | tuple[int, int], cfg: AugmentConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Warp a random crop of ``(H, W, C)`` image and ``(H, W)`` mask to ``crop`` size (reflect at edges)."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    a = _affine(cfg, rng)
    out_half = np.array([(ch - 1) / 2.0, (cw - 1) / 2.0])
    corners = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) * out_half
    half_extent = np.abs(corners @ a.T).max(axis=0) + 0.5
    centre = _centre(mask, mask.shape, half_extent, cfg, rng)
    offset = centre - a @ out_half
    img = np.empty((ch, cw, image.shape[2]), np.float32)
    src = image.astype(np.float32, copy=False)
    for c in range(image.shape[2]):
        ndimage.affine_transform(src[..., c], a, offset=offset, output_shape=(ch, cw), output=img[..., c], order=1, mode="mirror")
    m = ndimage.affine_transform(mask, a, offset=offset, output_shape=(ch, cw), order=0, mode="mirror")
    return img, m


# --------------------------------------------------------------------------- intensity
def _intensity(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, value_range: float) -> np.ndarray:
    if cfg.contrast:
        mean = img.mean()
        img = (img - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
    if cfg.brightness:
        img = img + rng.uniform(-cfg.brightness, cfg.brightness) * value_range
    if cfg.gamma:
        g = math.exp(rng.uniform(-cfg.gamma, cfg.gamma))
        img = np.power(np.clip(img / value_range, 0, 1), g) * value_range
    if cfg.saturation and img.shape[2] == 3:
        grey = img.mean(axis=2, keepdims=True)
        img = grey + (img - grey) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    if cfg.noise:
        img = img + rng.normal(0, cfg.noise * value_range, img.shape).astype(np.float32)
    return np.clip(img, 0, value_range).astype(np.float32, copy=False)


def hed_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator, value_range: float = 255.0) -> np.ndarray:
    """Perturb haematoxylin, eosin and DAB optical densities: od * U(1±s) + U(±s)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.clip(rgb / value_range, 0, 1))
    alpha = rng.uniform(1 - strength, 1 + strength, 3)
    beta = rng.uniform(-strength, strength, 3)
    out = hed2rgb(hed * alpha + beta)
    return (np.clip(out, 0, 1) * value_range).astype(np.float32)


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    crop: int | tuple[int, int],
    cfg: AugmentConfig,
    rng: np.random.Generator,
    value_range: float = 255.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A random training crop: geometry on image and mask, then intensity on the image.

    ``image`` is ``(H, W, C)`` in raw units (0..``value_range``), ``mask`` ``(H, W)`` integers.
    Returns a float32 ``(h, w, C)`` image in the same units and a mask of the mask's dtype.
    """
    img, m = random_crop(image, mask, crop, cfg, rng)
    if cfg.hed and img.shape[2] == 3:
        img = hed_jitter(img, cfg.hed, rng, value_range)
    img = _intensity(img, cfg, rng, value_range)
    return img, m


__all__ = ["AugmentConfig", "MODALITIES", "augment", "for_modality", "hed_jitter", "random_crop"]
