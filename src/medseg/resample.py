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
    """Resize an image (grey or RGB) to ``shape``, anti-aliased when shrinking; keeps the dtype."""
    from skimage.transform import resize

    if image.shape[:2] == tuple(shape):
        return image
    out_shape = tuple(shape) + image.shape[2:]
    shrinking = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    out = resize(image.astype(np.float32), out_shape, order=1, mode="reflect", anti_aliasing=shrinking, preserve_range=True)
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
    from skimage.transform import resize

    if mask.shape == tuple(shape):
        return mask
    if shape[0] >= mask.shape[0] and shape[1] >= mask.shape[1]:
        return resample_labels(mask, shape)
    cover = np.stack([resize((mask == c).astype(np.float32), shape, order=1, anti_aliasing=True, mode="reflect") for c in range(num_classes)])
    return cover.argmax(axis=0).astype(mask.dtype)


def target_shape(shape: tuple[int, ...], factor: float) -> tuple[int, int]:
    return (max(1, int(round(shape[0] * factor))), max(1, int(round(shape[1] * factor))))
