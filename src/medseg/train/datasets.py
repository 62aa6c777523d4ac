"""Image/mask pairs for training and evaluation: cases, readers, resampling and training samples.

A :class:`Case` names one image and its mask with what is known about it (split, leakage group,
acquisition source, pixel size). Masks come as class indices, binary masks with a threshold, or
instance ids; :func:`read_mask` turns each into class indices (instances keep their ids on request).
Images are read with :func:`medseg.io.read_image` (PNG, JPEG, TIFF, MetaImage) and resampled to the
pack's pixel size when both sizes are known (glomeruli: 0.5 vs 0.85 µm/px sources).

Splits are fixed rules decided by the data, never random per run: named recipes read the split
column their data README defines (see :mod:`medseg.train.recipes`); a plain folder uses its
``splits.csv`` (``name,split``) or, failing that, a hash of the file name (:func:`hash_split`).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medseg.resample import resample_image, resample_labels, resample_mask, scale_factor, target_shape  # noqa: F401
from medseg.errors import InputError, UsageError
from medseg.io import IMAGE_SUFFIXES, read_image, stem_of
from medseg.normalise import Normaliser, adapt_channels
from medseg.train.augment import NONE, AugmentConfig, augment

MASK_KINDS = ("index", "binary", "instance")


@dataclass(frozen=True)
class Case:
    """One image/mask pair and what is known about it."""

    id: str
    image: Path
    mask: Path | None = None
    split: str = ""
    mask_kind: str = "index"  # "index": class values; "binary": value > threshold; "instance": ids > 0
    threshold: float = 0.0
    mpp: float | None = None  # the image's own µm (or mm) per pixel, when known
    group: str = ""  # leakage group (video, slide, sequence)
    source: str = ""  # acquisition source, for per-source reports
    value_map: tuple[tuple[int, int], ...] = ()  # raw mask value -> class index (e.g. (7, 1), (8, 2))
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


# --------------------------------------------------------------------------- reading
def read_case_image(case: Case) -> tuple[np.ndarray, bool]:
    """The case's image as ``(H, W)`` grey or ``(H, W, 3)`` RGB, and whether it is RGB."""
    data = read_image(case.image)
    if data.is_stack:
        raise InputError(f"'{case.image.name}' is a stack of frames: training and evaluation take 2-D images; split the stack into frames first.")
    return data.array, data.rgb


def read_mask(case: Case, num_classes: int | None = None, keep_instances: bool = False) -> np.ndarray:
    """The case's mask as class indices (uint8), or instance ids with ``keep_instances``.

    Unknown values in an index mask are refused rather than guessed.
    """
    if case.mask is None:
        raise InputError(f"Case '{case.id}' has no mask: evaluation and training need reference masks.")
    data = read_image(case.mask)
    arr = data.array
    if data.rgb:
        if arr.shape[-1] == 3 and (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            arr = arr[..., 0]
        else:
            raise InputError(f"Mask '{case.mask.name}' is a colour image: masks must be single-channel class indices, binary or instance ids.")
    if arr.ndim != 2:
        raise InputError(f"Mask '{case.mask.name}' has shape {arr.shape}: masks must be 2-D.")
    if case.mask_kind == "binary":
        return (arr > case.threshold).astype(np.uint8)
    if case.mask_kind == "instance":
        if keep_instances:
            return arr.astype(np.uint32 if arr.max() > 65535 else np.uint16)
        return (arr > 0).astype(np.uint8)
    if case.mask_kind != "index":
        raise UsageError(f"Unknown mask kind '{case.mask_kind}': use one of {', '.join(MASK_KINDS)}.")
    if case.value_map:
        lut = {int(a): int(b) for a, b in case.value_map}
        out = np.zeros(arr.shape, np.uint8)
        for raw, cls in lut.items():
            out[arr == raw] = cls
        known = np.isin(arr, [0, *lut])
        if not known.all():
            bad = np.unique(arr[~known])[:5].tolist()
            raise InputError(f"Mask '{case.mask.name}' holds values {bad} that its dataset does not define: check the dataset's value map.")
        return out
    if num_classes is not None and arr.max() >= num_classes:
        bad = np.unique(arr[arr >= num_classes])[:5].tolist()
        raise InputError(f"Mask '{case.mask.name}' holds class values {bad} but the dataset has {num_classes} classes (0..{num_classes - 1}): give the right classes or a binary mask kind.")
    return arr.astype(np.uint8)


def instance_ids(case: Case) -> np.ndarray | None:
    """Instance ids for an instance-mask case (None for other kinds: objects are then components)."""
    return read_mask(case, keep_instances=True) if case.mask_kind == "instance" else None


# Resampling lives in medseg.resample (inference needs it too); re-exported here for the training code.


# --------------------------------------------------------------------------- splits
def hash_split(name: str, val_every: int = 10) -> str:
    """'val' for about one name in ``val_every`` (sha1 of the name), else 'train': fixed, not random."""
    return "val" if int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % val_every == 0 else "train"


def folder_cases(
    root: str | Path,
    mask_kind: str = "index",
    threshold: float = 0.0,
    images: str = "images",
    masks: Sequence[str] = ("masks", "labels"),
    split_file: str = "splits.csv",
) -> list[Case]:
    """Cases of a folder with ``images/`` and ``masks/`` (or ``labels/``) holding files of the same stem.

    The split comes from ``splits.csv`` (columns ``name`` and ``split``, optional ``group``, ``source``
    and ``mpp``, the image's µm per pixel) when present, else from :func:`hash_split` of the stem.
    """
    root = Path(root)
    img_dir = root / images
    mask_dir = next((root / m for m in masks if (root / m).is_dir()), None)
    if not img_dir.is_dir() or mask_dir is None:
        raise InputError(f"'{root}' is not a dataset folder: it needs '{images}/' and '{masks[0]}/' (or '{masks[-1]}/') with image and mask files of the same names.")
    if mask_kind not in MASK_KINDS:
        raise UsageError(f"Unknown mask kind '{mask_kind}': use one of {', '.join(MASK_KINDS)}.")
    mask_files = {stem_of(p): p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    table: dict[str, dict[str, str]] = {}
    if (root / split_file).is_file():
        with open(root / split_file, newline="", encoding="utf-8") as fh:
            table = {row["name"]: row for row in csv.DictReader(fh)}
    cases = []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = stem_of(p)
        if stem not in mask_files:
            continue
        row = table.get(stem, {})
        split = row.get("split") or hash_split(stem)
        mpp = float(row["mpp"]) if row.get("mpp") else None
        cases.append(Case(stem, p, mask_files[stem], split, mask_kind, threshold, mpp=mpp, group=row.get("group", stem), source=row.get("source", "")))
    if not cases:
        raise InputError(f"No image in '{img_dir}' has a mask of the same name in '{mask_dir}': check the folder layout.")
    return cases


def check_groups(cases: Iterable[Case]) -> None:
    """Refuse a split in which one leakage group appears on two sides."""
    seen: dict[str, str] = {}
    for c in cases:
        if not c.group:
            continue
        other = seen.setdefault(c.group, c.split)
        if other != c.split:
            raise InputError(f"Group '{c.group}' has cases in both '{other}' and '{c.split}': near-duplicates would leak between splits; fix the split table.")


def evenly(cases: Sequence[Case], limit: int | None) -> list[Case]:
    """At most ``limit`` cases spread evenly over the list (deterministic)."""
    if limit is None or limit >= len(cases):
        return list(cases)
    if limit <= 0:
        return []
    idx = np.unique(np.linspace(0, len(cases) - 1, limit).round().astype(int))
    return [cases[i] for i in idx]


def balance_sources(cases: Sequence[Case]) -> list[Case]:
    """The cases with each acquisition source's cases repeated so that every source makes about the
    same share of an epoch (one section of 185 tiles next to 10 biopsy tiles would otherwise teach
    the network that section). Cases without a source count as one source; order is kept per source."""
    groups: dict[str, list[Case]] = {}
    for c in cases:
        groups.setdefault(c.source, []).append(c)
    if len(groups) < 2:
        return list(cases)
    largest = max(len(g) for g in groups.values())
    out: list[Case] = []
    for g in groups.values():
        out.extend(g * max(1, round(largest / len(g))))
    return out


# --------------------------------------------------------------------------- samples
@dataclass
class Loaded:
    image: np.ndarray  # (H, W, C) model channels, raw units
    mask: np.ndarray  # (H, W) class indices
    stats: tuple[float, float]  # frame normalisation statistics
    value_range: float


class SegmentationDataset:
    """Training samples from cases: read (cached), resample to the target pixel size, augment, normalise.

    ``sample(i, rng)`` is a pure function of the case and the generator, which is what makes
    training resumable bit for bit and independent of the number of loader workers.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        in_channels: int,
        num_classes: int,
        normaliser: Normaliser,
        crop: int,
        augment_config: AugmentConfig = NONE,
        target_mpp: float | None = None,
        cache: bool = True,
    ) -> None:
        if not cases:
            raise InputError("The training split has no cases: check the dataset folder and split.")
        self.cases = list(cases)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.normaliser = normaliser
        self.crop = crop
        self.augment_config = augment_config
        self.target_mpp = target_mpp
        self.cache = cache
        self._cache: dict[int, Loaded] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def load(self, i: int) -> Loaded:
        if i in self._cache:
            return self._cache[i]
        case = self.cases[i]
        image, rgb = read_case_image(case)
        mask = read_mask(case, self.num_classes)
        if mask.shape != image.shape[:2]:
            raise InputError(f"Image '{case.image.name}' is {image.shape[:2]} but its mask is {mask.shape}: they must have the same size.")
        factor = scale_factor(case.mpp, self.target_mpp)
        if factor != 1.0:
            shape = target_shape(image.shape, factor)
            image, mask = resample_image(image, shape), resample_mask(mask, shape, self.num_classes)
        image = adapt_channels(image, rgb, self.in_channels, f"'{case.image.name}'")
        value_range = 255.0 if image.dtype == np.uint8 else float(max(np.abs(image).max(), 1.0))
        loaded = Loaded(image, mask, self.normaliser.frame_stats(image), value_range)
        if self.cache:
            self._cache[i] = loaded
        return loaded

    def sample(self, i: int, rng: np.random.Generator, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """A normalised ``(C, h, w)`` float32 crop and its ``(h, w)`` int64 class indices."""
        item = self.load(i)
        cfg = self.augment_config if train else NONE
        img, mask = augment(item.image, item.mask, self.crop, cfg, rng, item.value_range)
        x = self.normaliser.apply(img, item.stats)
        return x, mask.astype(np.int64)


class TrainSamples:
    """Global sample index -> (image, mask): epoch permutations and per-sample seeds from the run seed.

    Sample ``k`` belongs to epoch ``k // n`` and uses case ``perm(epoch)[k % n]`` with the generator
    ``default_rng([seed, k])``; usable directly or as a torch ``Dataset`` with any number of workers.
    """

    def __init__(self, dataset: SegmentationDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:  # large enough for any run; indices are computed, not stored
        return 2**62

    def case_index(self, k: int) -> int:
        n = len(self.dataset)
        epoch = k // n
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 1, epoch]).permutation(n)
            self._perms = {epoch: perm}
        return int(perm[k % n])

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.sample(self.case_index(int(k)), np.random.default_rng([self.seed, 2, int(k)]))

    def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        items = [self[step * batch_size + j] for j in range(batch_size)]
        return np.stack([a for a, _ in items]), np.stack([b for _, b in items])


def with_split(cases: Iterable[Case], split: str) -> list[Case]:
    return [c for c in cases if c.split == split]


def relabel(case: Case, **changes: Any) -> Case:
    return replace(case, **changes)


__all__ = [
    "Case",
    "MASK_KINDS",
    "SegmentationDataset",
    "TrainSamples",
    "balance_sources",
    "check_groups",
    "evenly",
    "folder_cases",
    "hash_split",
    "instance_ids",
    "read_case_image",
    "read_mask",
    "resample_image",
    "resample_labels",
    "resample_mask",
    "scale_factor",
    "target_shape",
]
