"""Tissue detection on a low-resolution overview, so background glass is never sent to a model.

Stained tissue is coloured and glass is grey-white, so the HSV saturation separates them: Otsu's
threshold on the saturation of an overview (about 8 µm/px), kept within sane bounds so an all-glass
or all-tissue overview is not split at noise, then closing, hole filling and removal of fragments
smaller than ``min_area_um2``. Pure black (scanner padding) is never tissue. The mask is finally
dilated by ``margin_um`` so tiles at the tissue border are still predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.io.slides import Slide

#: Bounds on the saturation threshold: glass is below 0.04 in practice; pale, lumen-rich tissue still has a median above 0.1.
SATURATION_BOUNDS = (0.04, 0.08)


@dataclass
class TissueMask:
    """A boolean tissue mask on an overview grid, with the level-0 pixels per mask pixel (y, x)."""

    mask: np.ndarray
    scale: tuple[float, float]
    threshold: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def touches(self, y0: float, x0: float, y1: float, x1: float) -> bool:
        """Whether the level-0 box ``[y0, y1) x [x0, x1)`` contains any tissue."""
        sy, sx = self.scale
        r0, c0 = max(int(math.floor(y0 / sy)), 0), max(int(math.floor(x0 / sx)), 0)
        r1, c1 = int(math.ceil(y1 / sy)), int(math.ceil(x1 / sx))
        return bool(self.mask[r0:r1, c0:c1].any())

    def fraction_of(self, y0: float, x0: float, y1: float, x1: float) -> float:
        sy, sx = self.scale
        box = self.mask[max(int(y0 // sy), 0) : int(math.ceil(y1 / sy)), max(int(x0 // sx), 0) : int(math.ceil(x1 / sx))]
        return float(box.mean()) if box.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 RGB image ((max - min) / max, 0 for black)."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0).astype(np.float32)


def tissue_from_rgb(
    rgb: np.ndarray,
    mpp: float | None = None,
    min_area_um2: float = 5_000.0,
    close_um: float = 50.0,
    margin_um: float = 16.0,
    threshold: float | None = None,
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB overview whose pixels are ``mpp`` µm wide; returns (mask, threshold).

    Without ``mpp`` the sizes are taken as if the overview were at 8 µm/px.
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    mpp = mpp or 8.0
    sat = saturation(rgb)
    not_black = rgb.max(axis=-1) > 25
    if threshold is None:
        values = sat[not_black]
        t = float(threshold_otsu(values)) if values.size and values.min() < values.max() else SATURATION_BOUNDS[1]
        threshold = float(np.clip(t, *SATURATION_BOUNDS))
    mask = (sat > threshold) & not_black
    r = max(1, int(round(close_um / mpp / 2)))
    mask = ndimage.binary_closing(mask, structure=disk(r), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    min_px = min_area_um2 / (mpp * mpp)
    if min_px > 1:
        lab, n = ndimage.label(mask)
        if n:
            areas = np.bincount(lab.ravel())
            keep = areas >= min_px
            keep[0] = False
            mask = keep[lab]
    m = int(round(margin_um / mpp))
    if m > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, structure=disk(m))
    return mask, threshold


def detect_tissue(slide: Slide, overview_mpp: float = 8.0, max_side: int = 4096, **kwargs) -> TissueMask:
    """Tissue mask of a slide from an overview at about ``overview_mpp`` µm/px (at most ``max_side`` px)."""
    h0, w0 = slide.shape
    side = max(h0, w0)
    if slide.mpp:
        side = min(side, int(math.ceil(side * slide.mpp / overview_mpp)))
    rgb, scale = slide.read_downsampled(max(64, min(side, max_side)))
    mpp = slide.mpp * (scale[0] + scale[1]) / 2.0 if slide.mpp else None
    mask, threshold = tissue_from_rgb(rgb, mpp, **kwargs)
    return TissueMask(mask, scale, threshold)


__all__ = ["SATURATION_BOUNDS", "TissueMask", "detect_tissue", "saturation", "tissue_from_rgb"]
