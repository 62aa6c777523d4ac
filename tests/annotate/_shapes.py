"""Synthetic instance masks for the correction tests: touching pairs, holes, separate objects."""

from __future__ import annotations

import numpy as np


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def scene(shape=(120, 160)) -> np.ndarray:
    """Object 1: two touching discs (a split candidate); 2: a disc with a hole; 3: a small square; 4: a disc beside 2."""
    m = np.zeros(shape, np.uint32)
    m[disc(shape, 35, 35, 16) | disc(shape, 35, 63, 16)] = 1
    ring = disc(shape, 85, 40, 18) & ~disc(shape, 85, 40, 6)
    m[ring] = 2
    m[10:22, 120:134] = 3
    m[disc(shape, 85, 78, 15)] = 4
    return m
