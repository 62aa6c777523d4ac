"""Clicks: parsing, checking, encoding as guidance maps, and simulating them the standard way.

A click is a point in image pixels (``x`` = column, ``y`` = row) that is positive (inside the
object) or negative (outside it). Interactive networks see clicks as guidance maps, one channel per
kind (DeepGrow/RITM): disks of a fixed radius around positive clicks, around negative clicks, and
the previous mask. Simulated clicks follow the number-of-clicks protocol (Xu et al. 2016, RITM):
the next click goes to the interior point (farthest from the region's border) of the largest error
region, positive in a missed part, negative in a wrongly included one; the first click is therefore
the centre of the object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg.errors import InputError, UsageError

# What an interactive pack's manifest records under "click_encoding" (the channels follow the image's).
DISKS = {"kind": "disks", "radius": 5, "channels": ["positive clicks", "negative clicks", "previous mask"]}


@dataclass(frozen=True)
class Click:
    """One click in image pixels: ``x`` column, ``y`` row, positive (inside) or negative (outside)."""

    x: float
    y: float
    positive: bool = True

    @property
    def row(self) -> int:
        return int(round(self.y))

    @property
    def col(self) -> int:
        return int(round(self.x))

    def scaled(self, factor: float, x0: float = 0.0, y0: float = 0.0) -> "Click":
        """The click in a window starting at ``(x0, y0)`` resampled by ``factor``."""
        return Click((self.x - x0) * factor, (self.y - y0) * factor, self.positive)

    def __str__(self) -> str:
        return f"{self.x:g},{self.y:g},{'+' if self.positive else '-'}"


@dataclass(frozen=True)
class Box:
    """A drag box in image pixels: ``x0 <= x < x1``, ``y0 <= y < y1``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def from_corners(cls, xa: float, ya: float, xb: float, yb: float) -> "Box":
        return cls(int(round(min(xa, xb))), int(round(min(ya, yb))), int(round(max(xa, xb))), int(round(max(ya, yb))))


_POINT = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?)\s*,\s*([-+]?\d+(?:\.\d*)?)\s*(?:,\s*([+-]|pos|neg|positive|negative)\s*)?$", re.IGNORECASE)


def parse_points(text: str) -> list[Click]:
    """``"x,y,+;x,y,-;..."`` -> clicks in order (the sign defaults to ``+``)."""
    clicks = []
    for part in [p for p in text.split(";") if p.strip()]:
        m = _POINT.match(part)
        if not m:
            raise UsageError(f"'{part.strip()}' is not a click: write clicks as \"x,y,+;x,y,-\" (column, row, + inside the object or - outside it).")
        sign = (m.group(3) or "+").lower()
        clicks.append(Click(float(m.group(1)), float(m.group(2)), sign in ("+", "pos", "positive")))
    if not clicks:
        raise UsageError('No clicks given: write them as "x,y,+;x,y,-" (column, row, + inside the object or - outside it).')
    return clicks


def check_clicks(clicks: Sequence[Click], shape: tuple[int, int]) -> None:
    """Refuse clicks outside an image of ``shape`` (H, W) with one sentence."""
    h, w = shape
    for c in clicks:
        if not (0 <= c.row < h and 0 <= c.col < w):
            raise InputError(f"The click at ({c.x:g}, {c.y:g}) is outside the image ({w} x {h} pixels): click on the image.")


def check_image(image: np.ndarray, name: str = "the image") -> None:
    """Refuse an empty (constant) image: nothing there can be an object."""
    if image.size == 0 or image.min() == image.max():
        raise InputError(f"{name} is empty (every pixel has the same value): there is no object to click on; load an image with content.")


# --------------------------------------------------------------------------- encoding
def disk_map(clicks: Sequence[Click], shape: tuple[int, int], radius: float, out: np.ndarray | None = None) -> np.ndarray:
    """Float32 map with 1 inside a disk of ``radius`` around each click (clicks outside are ignored).

    ``out``: a zeroed (H, W) array to draw into instead of a new one (only the disks are written).
    """
    out = np.zeros(shape, np.float32) if out is None else out
    r = int(np.ceil(radius))
    for c in clicks:
        y0, y1 = max(0, c.row - r), min(shape[0], c.row + r + 1)
        x0, x1 = max(0, c.col - r), min(shape[1], c.col + r + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1][(yy - c.y) ** 2 + (xx - c.x) ** 2 <= radius**2] = 1.0
    return out


def encode(
    clicks: Sequence[Click], previous: np.ndarray | None, shape: tuple[int, int], radius: float = DISKS["radius"], out: np.ndarray | None = None
) -> np.ndarray:
    """Guidance channels (3, H, W): positive disks, negative disks, previous mask.

    ``out``: a (3, H, W) float32 array to fill instead of a new one (e.g. a slice of a batch).
    """
    out = np.empty((3, *shape), np.float32) if out is None else out
    out[:2] = 0.0
    disk_map([c for c in clicks if c.positive], shape, radius, out[0])
    disk_map([c for c in clicks if not c.positive], shape, radius, out[1])
    if previous is None:
        out[2] = 0.0
    else:
        out[2] = previous
    return out


# --------------------------------------------------------------------------- simulation
def _border_distance(region: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Distance to the border of ``region`` (the image edge counts as border), computed on the region's
    bounding box only: returns (distances over the box, box row, box column).

    Exactly the whole-image transform's values: the ring of pixels around the box is outside the region,
    and for any outside pixel beyond it, the ring pixel it clamps to is at least as near.
    """
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dist = ndimage.distance_transform_edt(np.pad(region[r0:r1, c0:c1], 1))[1:-1, 1:-1]
    return dist, int(r0), int(c0)


def interior_point(region: np.ndarray) -> tuple[int, int, float]:
    """(row, col, distance) of the point of ``region`` farthest from its border (the image edge counts as border)."""
    dist, r0, c0 = _border_distance(region)
    rows, cols = np.nonzero(dist >= dist.max() - 1e-6)  # a ridge for elongated regions: take its middle
    i = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return int(rows[i]) + r0, int(cols[i]) + c0, float(dist[rows[i], cols[i]])


def next_click(target: np.ndarray, prediction: np.ndarray) -> Click | None:
    """The next simulated click: at the interior point of the largest error region.

    Positive when that region was missed (false negative), negative when it was wrongly included
    (false positive); ``None`` when the prediction is exact.
    """
    target, prediction = target.astype(bool), prediction.astype(bool)
    best: tuple[int, np.ndarray, bool] | None = None
    for error, positive in ((target & ~prediction, True), (prediction & ~target, False)):
        if not error.any():
            continue
        labels, n = ndimage.label(error)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            box = ndimage.find_objects(labels, max_label=k + 1)[k]  # the component's box: the distance transform needs no more
            region = np.zeros(error.shape, bool)
            region[box] = labels[box] == k + 1
            best = (int(sizes[k]), region, positive)
    if best is None:
        return None
    r, c, _ = interior_point(best[1])
    return Click(float(c), float(r), best[2])


def random_inside(target: np.ndarray, rng: np.random.Generator, far: float = 0.5) -> Click | None:
    """A random positive click inside ``target`` at least ``far`` x its largest border distance from the border.

    Training draws first clicks this way (inside the object, far from its border) so the network
    does not learn to expect the exact centre.
    """
    if not target.any():
        return None
    dist, r0, c0 = _border_distance(target.astype(bool))
    rows, cols = np.nonzero(dist >= far * dist.max())
    i = int(rng.integers(len(rows)))
    return Click(float(cols[i] + c0), float(rows[i] + r0), True)


def component_at(mask: np.ndarray, row: int, col: int) -> np.ndarray:
    """The connected component of ``mask`` (8-connected) holding pixel ``(row, col)``; empty if it is off."""
    if not mask[row, col]:
        return np.zeros(mask.shape, bool)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return labels == labels[row, col]


__all__ = ["Box", "Click", "DISKS", "check_clicks", "check_image", "component_at", "disk_map", "encode", "interior_point", "next_click", "parse_points", "random_inside"]
