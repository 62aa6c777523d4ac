"""Overlay pictures: an image with its label mask drawn on top, as an RGB uint8 array.

Used by the headless demo, and by comparisons and benchmarks that need a picture to look at. Qt-free:
numpy and scikit-image only.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from medseg.errors import InputError

Colour = str | Sequence[float]


def parse_colour(colour: Colour) -> np.ndarray:
    """``'#rrggbb'``/``'#rgb'`` or an RGB(A) sequence (0..1 floats or 0..255 ints) -> float32 RGB in [0, 1]."""
    if isinstance(colour, str):
        s = colour.strip().lstrip("#")
        if len(s) == 3:
            s = "".join(ch * 2 for ch in s)
        if len(s) not in (6, 8) or any(ch not in "0123456789abcdefABCDEF" for ch in s):
            raise InputError(f"Colour '{colour}' is not a hex colour: use '#rrggbb'.")
        return np.array([int(s[i : i + 2], 16) for i in (0, 2, 4)], np.float32) / 255.0
    arr = np.asarray(colour, dtype=np.float32).ravel()[:3]
    if arr.size != 3:
        raise InputError(f"Colour {colour!r} needs three components (red, green, blue).")
    return arr / 255.0 if arr.max() > 1.0 else arr


def class_colours(classes: Iterable) -> dict[int, str]:
    """``{value: colour}`` from a pack's classes (objects with ``value`` and ``color``, or dicts)."""
    out: dict[int, str] = {}
    for c in classes:
        value = c["value"] if isinstance(c, Mapping) else c.value
        colour = c["color"] if isinstance(c, Mapping) else c.color
        out[int(value)] = colour
    return out


def to_display_rgb(image: np.ndarray, rgb: bool | None = None) -> np.ndarray:
    """A grey or RGB image of any numeric type as RGB uint8 for display.

    uint8 is kept as is; other types are stretched between their 0.5th and 99.5th percentiles.
    """
    img = np.asarray(image)
    if rgb is None:
        rgb = img.ndim == 3 and img.shape[-1] in (3, 4)
    if rgb:
        if img.ndim != 3 or img.shape[-1] not in (3, 4):
            raise InputError(f"An RGB overlay needs an (H, W, 3) image, not shape {img.shape}: give one 2-D frame.")
        img = img[..., :3]
    elif img.ndim != 2:
        raise InputError(f"An overlay needs one 2-D frame, not shape {img.shape}: choose a frame of the stack first.")
    if img.dtype != np.uint8:
        f = img.astype(np.float32)
        lo, hi = (float(v) for v in np.percentile(f, [0.5, 99.5]))
        if hi <= lo:
            lo, hi = float(f.min()), float(f.max())
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        img = (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if not rgb:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img)


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    colours: Mapping[int, Colour],
    alpha: float = 0.35,
    outline: bool = True,
    outline_width: int = 1,
    background: int | None = 0,
    rgb: bool | None = None,
) -> np.ndarray:
    """Blend coloured label regions over an image and draw their outlines.

    Args:
        image: one 2-D frame, grey ``(H, W)`` or RGB ``(H, W, 3)``, any numeric type.
        labels: integer label image ``(H, W)`` with the class values of ``colours``.
        colours: ``{label value: colour}``; values without a colour are drawn in a fixed palette.
        alpha: opacity of the fill (0 = outlines only).
        outline: draw the region borders at full opacity.
        outline_width: border thickness in pixels.
        background: label value left undrawn (``None`` draws every value).
        rgb: whether ``image`` is RGB (``None`` guesses from a last axis of 3 or 4).

    Returns:
        ``(H, W, 3)`` uint8 RGB picture.
    """
    base = to_display_rgb(image, rgb)
    labels = np.asarray(labels)
    if labels.shape != base.shape[:2]:
        raise InputError(f"The labels have shape {labels.shape} but the image is {base.shape[:2]}: give the mask of this image.")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"Overlay opacity {alpha} must be between 0 and 1.")
    out = base.astype(np.float32) / 255.0
    values = [int(v) for v in np.unique(labels) if background is None or v != background]
    if values and outline:
        from skimage.segmentation import find_boundaries

        edges = find_boundaries(labels, mode="inner", background=background if background is not None else 0)
        if outline_width > 1:
            from scipy.ndimage import binary_dilation

            edges = binary_dilation(edges, iterations=outline_width - 1) & (labels != background if background is not None else True)
    for i, v in enumerate(values):
        colour = parse_colour(colours[v]) if v in colours else parse_colour(_FALLBACK[i % len(_FALLBACK)])
        region = labels == v
        out[region] = (1.0 - alpha) * out[region] + alpha * colour
        if outline:
            out[region & edges] = colour
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


_FALLBACK = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]

__all__ = ["class_colours", "parse_colour", "render_overlay", "to_display_rgb"]
