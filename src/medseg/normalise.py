"""Input normalisation as a pack records it (spec §11.2), and channel adaptation.

- ``{"kind": "zscore"}``: per image (per frame) mean/std over all pixels and channels, std floored
  at 1e-6 (ultrasound, MRI).
- ``{"kind": "fixed", "mean": [...], "std": [...]}``: fixed per-channel statistics on intensities
  scaled to [0, 1] (pathology, endoscopy).

Statistics are computed once per frame and applied per tile, so tiled and untiled inference see
identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import InputError, ModelError

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Normaliser:
    kind: str = "zscore"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    scale: float = 255.0

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> "Normaliser":
        spec = dict(spec or {"kind": "zscore"})
        kind = spec.get("kind", "zscore")
        if kind == "zscore":
            return cls("zscore")
        if kind == "fixed":
            return cls("fixed", tuple(map(float, spec["mean"])), tuple(map(float, spec["std"])), float(spec.get("scale", 255.0)))
        raise ModelError(f"Unknown normalisation '{kind}' in the pack manifest: use 'zscore' or 'fixed'.")

    def to_spec(self) -> dict[str, Any]:
        if self.kind == "zscore":
            return {"kind": "zscore"}
        return {"kind": "fixed", "mean": list(self.mean), "std": list(self.std), "scale": self.scale}

    def frame_stats(self, frame: np.ndarray) -> tuple[float, float]:
        """Statistics of one frame (channels last); constant frames are refused."""
        if self.kind != "zscore":
            return (0.0, 1.0)
        # Two passes over row blocks: no full-size float copy of a large frame.
        rows = max(1, (1 << 22) // max(1, frame[0].size))
        n = frame.size
        total = sum(float(frame[i : i + rows].sum(dtype=np.float64)) for i in range(0, frame.shape[0], rows))
        mean = total / n
        sq = sum(float(np.square(frame[i : i + rows].astype(np.float64) - mean).sum()) for i in range(0, frame.shape[0], rows))
        return mean, max(float(np.sqrt(sq / n)), 1e-6)

    def apply(self, tile: np.ndarray, stats: tuple[float, float]) -> np.ndarray:
        """Normalise a (H, W, C) tile to float32 (C, H, W)."""
        x = tile.astype(np.float32, copy=False)
        if self.kind == "zscore":
            x = (x - np.float32(stats[0])) / np.float32(stats[1])
        else:
            mean = np.asarray(self.mean, np.float32)
            std = np.asarray(self.std, np.float32)
            x = (x / np.float32(self.scale) - mean) / std
        return np.ascontiguousarray(np.moveaxis(x, -1, 0))


def adapt_channels(frame: np.ndarray, rgb: bool, in_channels: int, source: str = "the image") -> np.ndarray:
    """Return the frame as (H, W, in_channels): grey replicated for RGB models, RGB to luminance for grey ones."""
    if rgb:
        if in_channels == 3:
            return frame
        if in_channels == 1:
            return (frame.astype(np.float32) @ LUMA)[..., None]
    else:
        if in_channels == 1:
            return frame[..., None]
        if in_channels == 3:
            return np.repeat(frame[..., None], 3, axis=-1)
    raise InputError(f"{source} has {3 if rgb else 1} channel(s) but the model takes {in_channels}: convert the image first.")


def check_not_constant(frame: np.ndarray, source: str = "the image") -> None:
    lo, hi = frame.min(), frame.max()
    if lo == hi:
        raise InputError(f"{source} is constant (every pixel is {lo}): there is nothing to segment; check that the right image was loaded.")
