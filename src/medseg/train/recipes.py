"""Named dataset recipes: where the data lives, its fixed split, classes, normalisation and augmentation.

- ``psfhs``: intrapartum transperineal ultrasound, pubic symphysis (1) and fetal head (2); split by
  ID block (``frames.csv`` column ``split``: train / val / holdout); per-image z-score; orientation
  kept; AoP/HSD scored on evaluation (spec §9).
- ``glomeruli``: PAS kidney tiles, glomerulus (1); split by tile-number ranges (``tiles.csv`` column
  ``split``: train / val / test / external-test); every tile resampled from its own µm/px (column
  ``mpp``) to the pack's 1.0 µm/px, so 1024² AIDPATH tiles (0.5 µm/px) become 512² and a glomerulus
  (100-250 µm) fits a 384 px crop; fixed ImageNet mean/std; stain jitter; object F1 (spec §10.3).
- ``polyp``: colonoscopy (Kvasir-SEG + CVC-ClinicDB), polyp (1); ``splits.csv`` column ``split``
  (train / val / test); fixed ImageNet mean/std; flips, rotations, colour jitter.

The data root is, in order: an explicit ``data_root``, ``$MEDSEG_DATA``, ``../shared/data`` beside the
repository (or beside the current folder). A folder path instead of a recipe name gives a generic
recipe over ``images/`` + ``masks/`` (see :func:`medseg.train.datasets.folder_cases`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medseg.errors import InputError, UsageError
from medseg.train.augment import AugmentConfig, for_modality
from medseg.train.datasets import Case, check_groups, folder_cases
from medseg.train.packs import DEFAULT_COLOURS, ClassInfo

IMAGENET = {"kind": "fixed", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": 255.0}
ZSCORE = {"kind": "zscore"}

PSFHS_ATTRIBUTION = (
    "Contains images and segmentation masks from the PSFHS dataset (Chen G, Bai J, Ou Z, Lu Y, Wang H, Scientific Data 11:436, 2024, "
    "doi:10.1038/s41597-024-03266-4), licensed under CC BY 4.0. Changes: converted from MetaImage to PNG, a subset of 761 of the 1358 frames."
)
GLOMERULI_ATTRIBUTION = (
    "AIDPATH tiles: Bueno G et al., Data in Brief 29 (2020) 105314, doi:10.17632/k7nvtgn2x6.3 (CC BY 4.0). HuBMAP tiles: HuBMAP Consortium, "
    "TMC-Vanderbilt (BIOMIC), CNS group at Indiana University (ccf-research-ftu, MIT). Aachen tiles (external test only): Bouteldja N et al., "
    "J Am Soc Nephrol 32(1):52-68 (2021), AGPL-3.0."
)
POLYP_ATTRIBUTION = (
    "Kvasir-SEG (Jha D et al., MMM 2020) and CVC-ClinicDB (Bernal J et al., CMIG 43 (2015) 99-111): research and education only, "
    "no commercial use; images downscaled/re-encoded, masks binarised."
)


@dataclass(frozen=True)
class Recipe:
    """Everything needed to train and evaluate on one dataset."""

    name: str
    title: str
    modality: str
    folder: str
    in_channels: int
    class_names: tuple[str, ...]
    normalisation: dict[str, Any]
    crop: int
    batch_size: int
    tile: int
    overlap: float = 0.25
    mpp: float | None = None  # target µm per pixel (packs run at this size)
    splits: tuple[str, ...] = ("train", "val", "test")
    objects: bool = False  # score object-level F1 (components)
    min_object_area_um2: float | None = None  # remove predicted components smaller than this before scoring
    biometry: bool = False  # score AoP/HSD (ultrasound)
    distance_unit: str = "px"
    licence: str = ""
    attribution: str = ""
    split_rule: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    root: Path | None = None  # for folder recipes
    mask_kind: str = "index"
    threshold: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def classes(self) -> list[ClassInfo]:
        colours = {"psfhs": ["#000000", "#e6194b", "#3cb44b"], "glomeruli": ["#000000", "#00e676"], "polyp": ["#000000", "#ffe119"]}.get(self.name, DEFAULT_COLOURS)
        return [ClassInfo(i, n, colours[i % len(colours)]) for i, n in enumerate(self.class_names)]

    def path(self, data_root: str | os.PathLike | None = None) -> Path:
        if self.root is not None:
            return self.root
        folder = data_root_dir(data_root) / self.folder
        if not folder.is_dir():
            raise InputError(f"The '{self.name}' data folder '{folder}' is absent: give --data-root (or MEDSEG_DATA) pointing at the folder that holds '{self.folder}/'.")
        return folder

    def cases(self, split: str | None = None, data_root: str | os.PathLike | None = None) -> list[Case]:
        """The cases of one split (all splits with ``None``), in a fixed order."""
        folder = self.path(data_root)
        reader = _READERS.get(self.name)
        cases = reader(folder) if reader else folder_cases(folder, self.mask_kind, self.threshold)
        check_groups(cases)
        if split is None:
            return cases
        split = canonical_split(self, split)
        return [c for c in cases if c.split == split]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "modality": self.modality,
            "crop": self.crop,
            "batch_size": self.batch_size,
            "mpp": self.mpp,
            "normalisation": self.normalisation,
            "augment": self.augment.to_dict(),
            "splits": list(self.splits),
        }


_ALIASES = {"validation": "val", "valid": "val", "hold-out": "holdout", "external": "external-test"}


def canonical_split(recipe: Recipe, split: str) -> str:
    s = _ALIASES.get(split.lower(), split.lower())
    if recipe.name == "psfhs" and s == "test":
        s = "holdout"
    if recipe.name != "psfhs" and s == "holdout":
        s = "test"
    if recipe.root is None and s not in recipe.splits:
        raise UsageError(f"Dataset '{recipe.name}' has no split '{split}': choose one of {', '.join(recipe.splits)}.")
    return s


# --------------------------------------------------------------------------- data root
def data_root_dir(data_root: str | os.PathLike | None = None) -> Path:
    """The shared data folder: explicit, ``$MEDSEG_DATA``, or ``../shared/data`` beside the repository or cwd."""
    if data_root:
        return Path(data_root)
    if os.environ.get("MEDSEG_DATA"):
        return Path(os.environ["MEDSEG_DATA"])
    repo = Path(__file__).resolve().parents[3]
    for candidate in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared" / "data"


# --------------------------------------------------------------------------- readers
def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"'{path}' is missing: the dataset folder is incomplete.")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _psfhs(folder: Path) -> list[Case]:
    cases = []
    for r in _rows(folder / "frames.csv"):
        if r.get("shipped", "1") not in ("1", "true", "True"):
            continue
        cases.append(Case(r["id"], folder / "images" / f"{r['id']}.png", folder / "labels" / f"{r['id']}.png", r["split"], "index", group=r["group"], source=r["source"]))
    return cases


def _glomeruli(folder: Path) -> list[Case]:
    return [
        Case(r["name"], folder / "images" / f"{r['name']}.jpg", folder / "masks" / f"{r['name']}.png", r["split"], "binary", 0.0, float(r["mpp"]), group=r["case"], source=r["source"])
        for r in _rows(folder / "tiles.csv")
    ]


def _polyp(folder: Path) -> list[Case]:
    cases = []
    for r in _rows(folder / "splits.csv"):
        group = f"cvc-seq{r['sequence']}" if r["dataset"] == "cvc" and r.get("sequence") else f"{r['dataset']}/{r['name']}"
        cases.append(Case(f"{r['dataset']}/{r['name']}", folder / r["dataset"] / "images" / f"{r['name']}.jpg", folder / r["dataset"] / "masks" / f"{r['name']}.png", r["split"], "binary", 0.0, group="", source=r["dataset"], meta={"sequence_group": group}))
    return cases


_READERS = {"psfhs": _psfhs, "glomeruli": _glomeruli, "polyp": _polyp}

RECIPES: dict[str, Recipe] = {
    "psfhs": Recipe(
        name="psfhs",
        title="Pubic symphysis and fetal head in intrapartum ultrasound (PSFHS)",
        modality="ultrasound",
        folder="psfhs",
        in_channels=1,
        class_names=("background", "pubic symphysis", "fetal head"),
        normalisation=ZSCORE,
        crop=256,
        batch_size=8,
        tile=256,
        splits=("train", "val", "holdout"),
        biometry=True,
        licence="CC-BY-4.0",
        attribution=PSFHS_ATTRIBUTION,
        split_rule="PSFHS ID blocks (frames.csv column split): train 03744-04349, 04573-04790, 05020-05101; val 04350-04572; holdout 04791-05019; no inferred video group spans two splits",
        augment=for_modality("ultrasound"),
    ),
    "glomeruli": Recipe(
        name="glomeruli",
        title="Glomeruli in PAS kidney tissue",
        modality="pathology",
        folder="glomeruli",
        in_channels=3,
        class_names=("background", "glomerulus"),
        normalisation=IMAGENET,
        crop=384,
        batch_size=4,
        tile=512,
        mpp=1.0,
        splits=("train", "val", "test", "external-test"),
        objects=True,
        min_object_area_um2=2000.0,
        distance_unit="µm",
        licence="CC-BY-4.0 (AIDPATH images), MIT (HuBMAP CCF annotations)",
        attribution=GLOMERULI_ATTRIBUTION,
        split_rule="tiles.csv column split: AIDPATH tile id <= 10150 and the whole HuBMAP section train, 10151-10179 val, >= 10180 test, Aachen mouse tiles external-test",
        augment=for_modality("pathology"),
    ),
    "polyp": Recipe(
        name="polyp",
        title="Polyps in colonoscopy (Kvasir-SEG + CVC-ClinicDB)",
        modality="endoscopy",
        folder="polyp",
        in_channels=3,
        class_names=("background", "polyp"),
        normalisation=IMAGENET,
        crop=256,
        batch_size=8,
        tile=352,
        splits=("train", "val", "test"),
        licence="research and education only (Kvasir-SEG, CVC-ClinicDB terms); no commercial use",
        attribution=POLYP_ATTRIBUTION,
        split_rule="splits.csv column split: test = PraNet test part; val = sha1('<dataset>/<name>') % 10 == 0 within PraNet train; train = the rest",
        augment=for_modality("endoscopy"),
    ),
}


def names() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str, classes: list[str] | None = None, mask_kind: str | None = None, threshold: float | None = None, rgb: bool | None = None) -> Recipe:
    """A named recipe, or a generic recipe over a dataset folder (``images/`` + ``masks/``)."""
    if name in RECIPES:
        recipe = RECIPES[name]
        if classes:
            if len(classes) != recipe.num_classes:
                raise UsageError(f"Dataset '{name}' has {recipe.num_classes} classes ({', '.join(recipe.class_names)}), not {len(classes)}.")
            recipe = replace(recipe, class_names=tuple(classes))
        return recipe
    root = Path(name)
    if not root.is_dir():
        raise UsageError(f"Unknown dataset '{name}': choose one of {', '.join(names())} or give a folder with images/ and masks/.")
    kind = mask_kind or "index"
    class_names = tuple(classes) if classes else ("background", "foreground")
    cases = folder_cases(root, kind, threshold or 0.0)
    if rgb is None:
        from medseg.train.datasets import read_case_image

        rgb = read_case_image(cases[0])[1]
    return Recipe(
        name=root.name,
        title=f"Dataset folder {root}",
        modality="generic",
        folder=str(root),
        in_channels=3 if rgb else 1,
        class_names=class_names,
        normalisation=IMAGENET if rgb else ZSCORE,
        crop=256,
        batch_size=8,
        tile=256,
        splits=tuple(sorted({c.split for c in cases})),
        root=root,
        split_rule="splits.csv (name,split) in the folder, else sha1(name) % 10 == 0 -> val",
        mask_kind=kind,
        threshold=threshold or 0.0,
        augment=for_modality("none"),
    )


__all__ = ["IMAGENET", "RECIPES", "Recipe", "ZSCORE", "canonical_split", "data_root_dir", "get_recipe", "names"]
