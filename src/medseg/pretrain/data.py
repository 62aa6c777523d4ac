"""Image-report pairs from a CSV file, images as small squares in [-1, 1], and the batches of an epoch.

Images are read with :func:`medseg.io.read_image`, turned grey (luminance for RGB), resized so that
the longer side is the load size (keeping the aspect ratio) and zero-padded to a centred square
(spec §8.2, with ``load = image_size * 8 / 7`` as 256 is to 224). Training takes random crops of
``image_size``; everything else the centre crop.

Reports are case-level in many archives (one note for several images of a patient), so an epoch
draws one image per distinct report: no batch holds the same report twice (spec §8.2 data caveat).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from medseg.engine.progress import CancelToken, Job, Progress, check_cancel
from medseg.errors import InputError, UsageError
from medseg.io import read_image
from medseg.normalise import adapt_channels
from medseg.resample import resample_image


@dataclass
class PairRecord:
    """One archived image with its report; ``fields`` keeps every CSV column (findings, ids, sources)."""

    image: Path
    text: str
    group: str
    fields: dict[str, str] = field(default_factory=dict)


def read_pairs(path: str | Path, image_col: str = "image", text_col: str = "text", group_col: str | None = "patientid", require_images: bool = True) -> list[PairRecord]:
    """Rows of a CSV of image-report pairs; image paths may be relative to the CSV's folder.

    ``group_col`` names the column that ties images of one patient together (validation holds out
    whole groups); without it each row is its own group.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"'{path}' does not exist: give a CSV file of image-report pairs.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"'{path.name}' is not a readable UTF-8 CSV file ({exc}): save it as comma-separated UTF-8 with a header row.") from exc
    wanted = [c for c in (image_col, text_col, group_col) if c]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UsageError(
            f"'{path.name}' has no column {', '.join(repr(c) for c in missing)}: its columns are {', '.join(columns) or '(none)'}; "
            "name the right ones with --image-col, --text-col and --group-col."
        )
    records, absent = [], []
    for i, row in enumerate(rows):
        image = Path(row[image_col])
        if not image.is_absolute():
            image = path.parent / image
        if require_images and not image.is_file():
            absent.append(row[image_col])
        group = row[group_col] if group_col else str(i)
        records.append(PairRecord(image, (row[text_col] or "").strip(), str(group), dict(row)))
    if absent:
        raise InputError(f"{len(absent)} image(s) listed in '{path.name}' do not exist (first: '{absent[0]}'): fix the paths or the --image-col column.")
    if not records:
        raise InputError(f"'{path.name}' lists no image-report pairs: add rows below the header.")
    return records


def holdout_groups(records: Sequence[PairRecord], fraction: float) -> set[str]:
    """Groups held out for validation: a fixed hash rule, ``sha1(group) % 1000 < fraction * 1000``."""
    if fraction <= 0:
        return set()
    groups = {r.group for r in records}
    held = {g for g in groups if int(hashlib.sha1(g.encode("utf-8")).hexdigest(), 16) % 1000 < fraction * 1000}
    return held if len(held) < len(groups) else set()


def patient_folds(records: Sequence[PairRecord], n_folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Test indices of ``n_folds`` group-level folds (each group in exactly one fold), image counts balanced greedily."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.group, []).append(i)
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    rng.shuffle(names)
    names.sort(key=lambda g: -len(groups[g]))  # stable: shuffled within equal sizes
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    for g in names:
        smallest = min(range(n_folds), key=lambda f: len(folds[f]))
        folds[smallest].extend(groups[g])
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def load_size(image_size: int) -> int:
    return int(round(image_size * 8 / 7))


def square_image(array: np.ndarray, rgb: bool, size: int, region: tuple[int, int, int, int] | None = None, source: str = "the image") -> np.ndarray:
    """A grey uint8 ``size x size`` square: optional crop (y0, x0, y1, x1), longer side resized to ``size``, centred zero padding."""
    if array.ndim - (1 if rgb else 0) != 2:
        raise InputError(f"{source} is a stack or volume (shape {tuple(array.shape)}): choose one 2-D frame.")
    if region is not None:
        y0, x0, y1, x1 = (int(v) for v in region)
        h, w = array.shape[:2]
        y0, x0, y1, x1 = max(0, y0), max(0, x0), min(h, y1), min(w, x1)
        if y1 - y0 < 4 or x1 - x0 < 4:
            raise InputError(f"The region ({region[0]}, {region[1]}) to ({region[2]}, {region[3]}) covers less than 4x4 pixels of {source}: draw a larger region inside the image.")
        array = array[y0:y1, x0:x1]
    grey = adapt_channels(np.asarray(array), rgb, 1, source)[..., 0].astype(np.float32)
    lo, hi = float(grey.min()), float(grey.max())
    if np.issubdtype(np.asarray(array).dtype, np.integer) and np.asarray(array).dtype.itemsize == 1:
        scaled = grey
    else:  # other ranges (16-bit, float): stretch to 0..255
        scaled = (grey - lo) / max(hi - lo, 1e-6) * 255.0
    h, w = scaled.shape
    f = size / max(h, w)
    nh, nw = max(1, int(round(h * f))), max(1, int(round(w * f)))
    small = resample_image(scaled, (nh, nw))
    out = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return out


def load_square(path: Path, size: int) -> np.ndarray:
    image = read_image(path)
    return square_image(image.array, image.rgb, size, source=f"'{Path(path).name}'")


def load_images(records: Sequence[PairRecord], size: int, cancel: CancelToken | None = None) -> Job[np.ndarray]:
    """Every record's image as a ``size x size`` grey square: (N, size, size) uint8."""
    out = np.zeros((len(records), size, size), np.uint8)
    for i, r in enumerate(records):
        check_cancel(cancel)
        out[i] = load_square(r.image, size)
        if i % 8 == 0 or i == len(records) - 1:
            yield Progress(i + 1, len(records), f"reading images ({i + 1}/{len(records)})")
    return out


def to_tensor(squares: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1] (mean 0.5, std 0.5 on [0, 1], spec §8.2)."""
    return torch.from_numpy(squares).float().div_(127.5).sub_(1.0).unsqueeze(1)


def centre_crop(squares: np.ndarray, size: int) -> np.ndarray:
    off = (squares.shape[-1] - size) // 2
    return squares[..., off : off + size, off : off + size]


def random_crop(squares: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    span = squares.shape[-1] - size
    out = np.empty(squares.shape[:-2] + (size, size), squares.dtype)
    for i in range(squares.shape[0]):
        y, x = rng.integers(0, span + 1, size=2)
        out[i] = squares[i, y : y + size, x : x + size]
    return out


def epoch_batches(texts: Sequence[str], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch: one random image per distinct report, in random order, cut into batches (a lone last item joins the one before).

    A pure function of (seed, epoch), so a resumed run sees the same batches."""
    rng = np.random.default_rng([seed, epoch])
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_text.setdefault(t, []).append(i)
    picks = np.array([members[rng.integers(len(members))] for members in by_text.values()], dtype=np.int64)
    picks = picks[rng.permutation(len(picks))]
    batches = [picks[i : i + batch_size] for i in range(0, len(picks), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = np.concatenate([batches[-2], batches.pop()])
    return batches


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


__all__ = [
    "PairRecord",
    "centre_crop",
    "epoch_batches",
    "holdout_groups",
    "iter_chunks",
    "load_images",
    "load_size",
    "load_square",
    "patient_folds",
    "random_crop",
    "read_pairs",
    "square_image",
    "to_tensor",
]
