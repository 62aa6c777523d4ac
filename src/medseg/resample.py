"""Resampling between pixel sizes: images (anti-aliased), label images (nearest, values exact), masks.

Packs record the µm (or mm) per pixel they were trained at; inference and training bring images to
that size and labels back to the image's own grid with these functions.
"""

from __future__ import annotations

import numpy as np


def scale_factor(source_mpp: float | None, target_mpp: float | None) -> float:
    """How much to zoom an image taken at ``source_mpp`` to reach ``target_mpp`` (1 when unknown)."""
    if not source_mpp or not target_mpp:
        return 1.0
    f = float(source_mpp) / float(target_mpp)
    return 1.0 if abs(f - 1.0) < 1e-3 else f


def resample_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an image (grey, RGB, or any trailing channel axes) to ``shape`` by bilinear interpolation
    on pixel centres, anti-aliased along an axis that shrinks (a triangle filter as wide as the zoom,
    as PIL does); keeps the dtype. torch's kernel is 4-9x faster than skimage's Gaussian + resize
    (``benchmarks/resample.py``), which matters on every tile of a slide and every click on a resampled image."""
    import torch
    import torch.nn.functional as F

    if image.shape[:2] == tuple(shape):
        return image
    h, w = image.shape[:2]
    rest = image.shape[2:]
    planes = np.ascontiguousarray(image, dtype=np.float32).reshape(h, w, -1)
    x = torch.from_numpy(planes).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        y = F.interpolate(x, size=(int(shape[0]), int(shape[1])), mode="bilinear", align_corners=False, antialias=True)
    out = y[0].permute(1, 2, 0).reshape(tuple(shape) + rest).numpy()
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(image.dtype)


def resample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a label image to ``shape`` by nearest neighbour (pixel centres), keeping values exact."""
    if labels.shape == tuple(shape):
        return labels
    h, w = labels.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def resample_mask(mask: np.ndarray, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """Resize class indices by area-weighted vote (each class's coverage, then argmax): no jagged shrinking."""
    if mask.shape == tuple(shape):
        return mask
    if shape[0] >= mask.shape[0] and shape[1] >= mask.shape[1]:
        return resample_labels(mask, shape)
    cover = resample_image(np.stack([mask == c for c in range(num_classes)], axis=-1).astype(np.float32), shape)
    return cover.argmax(axis=-1).astype(mask.dtype)


def target_shape(shape: tuple[int, ...], factor: float) -> tuple[int, int]:
    return (max(1, int(round(shape[0] * factor))), max(1, int(round(shape[1] * factor))))
