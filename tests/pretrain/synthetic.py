"""A small synthetic archive of image-report pairs (no real data needed): each finding has its own image
pattern and its own report wording, so an encoder can learn to tell them apart."""

from __future__ import annotations

import csv
from pathlib import Path

import imageio.v3 as iio
import numpy as np

FINDINGS = {
    "effusion": "Blunting of the left costophrenic angle. Small pleural effusion on the left side.",
    "consolidation": "Dense consolidation in the right lower lobe. Air bronchograms are visible in the consolidation.",
    "normal": "Clear lungs without focal opacity. Heart size is normal and there is no effusion.",
}


def pattern(finding: str, seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 90 + 40 * np.exp(-((xx - 0.5) ** 2) / 0.08)  # a bright mediastinum
    if finding == "effusion":
        base += 90 * (yy > 0.7) * (xx < 0.5)
    elif finding == "consolidation":
        base += 100 * np.exp(-(((xx - 0.7) ** 2) + ((yy - 0.6) ** 2)) / 0.01)
    image = base + rng.normal(0, 8, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_archive(folder: Path, per_finding: int = 4, size: int = 48) -> Path:
    """Images under ``folder/images`` and ``folder/pairs.csv`` (image, text, patientid, finding); returns the CSV."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for f, (finding, text) in enumerate(FINDINGS.items()):
        for i in range(per_finding):
            name = f"images/{finding}-{i}.png"
            iio.imwrite(folder / name, pattern(finding, 100 * f + i, size))
            rows.append({"image": name, "text": f"Case {i} of {finding}. {text} Patient number {i} {finding}.", "patientid": f"{finding}{i // 2}", "finding": finding})
    path = folder / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
