"""The shipped packs: all three are there, load with their sha256 verified, record in their manifest
what a user and a reviewer need, and segment real validation images far better than chance."""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pytest

from medseg.train.datasets import evenly, read_mask
from medseg.train.evaluate import EvalOptions, evaluate_iter
from medseg.train.packs import WEIGHTS, Pack, load_pack, resources_dir, sha256_file
from medseg.train.recipes import get_recipe
from tests.conftest import data_dir

EXPECTED = {"ultrasound-fhps": "psfhs", "kidney-glomeruli": "glomeruli", "colon-polyp": "polyp"}
MULTI_SEQUENCE = {"cardiac-myops"}  # several inputs per case: tested in tests/multiseq and benchmarks/multiseq.py
OTHER_TASKS = {"ultrasound-tapslf", "ultrasound-keyframes"}  # multi-task and key-frame packs: tests/train/test_shipped_ultrasound_packs.py
INTERACTIVE = {"colon-polyp-click", "ultrasound-fhps-click"}  # click-guided packs: tests/interactive
PACKS_DIR = resources_dir() / "packs"
N_IMAGES = 5
MAX_WEIGHTS_MIB = 25


def shipped_ids() -> set[str]:
    if not PACKS_DIR.is_dir():
        return set()
    return {p.name for p in PACKS_DIR.iterdir() if (p / "manifest.json").is_file()}


def require_shipped(pack_id: str) -> None:
    """Skip while no pack is shipped yet; once any is, every expected pack must be there."""
    ids = shipped_ids()
    if not ids:
        pytest.skip(f"no packs are shipped yet in {PACKS_DIR} (they are added when training has finished)")
    assert pack_id in ids, f"pack '{pack_id}' is missing from {PACKS_DIR} (found: {', '.join(sorted(ids))})"


@lru_cache(maxsize=None)
def shipped_pack(pack_id: str) -> Pack:
    return load_pack(PACKS_DIR / pack_id)  # verifies the weights' sha256 and the architecture


def run(job):
    try:
        while True:
            next(job)
    except StopIteration as stop:
        return stop.value


def test_the_three_packs_are_shipped():
    ids = shipped_ids()
    if not ids:
        pytest.skip(f"no packs are shipped yet in {PACKS_DIR} (they are added when training has finished)")
    assert set(EXPECTED) | MULTI_SEQUENCE <= ids <= set(EXPECTED) | MULTI_SEQUENCE | OTHER_TASKS | INTERACTIVE


@pytest.mark.parametrize("pack_id", sorted(EXPECTED))
def test_pack_loads_by_id_with_verified_weights(pack_id, monkeypatch):
    require_shipped(pack_id)
    monkeypatch.delenv("MEDSEG_MODELS", raising=False)
    pack = load_pack(pack_id)
    assert pack.id == pack_id and pack.path.resolve() == (PACKS_DIR / pack_id).resolve()
    weights = pack.path / pack.manifest["weights"]["file"]
    assert weights.name == WEIGHTS
    assert sha256_file(weights) == pack.manifest["weights"]["sha256"]


def _averaged_from_trained_packs(averaged: list, dataset: str) -> bool:
    """Every averaged pack was trained on the dataset by a recorded command, or is itself an average of such packs."""
    for a in averaged:
        if not a["sha256"] or abs(sum(x["weight"] for x in averaged) - 1.0) > 1e-6:
            return False
        if a["command"].startswith("medseg average"):
            if not a.get("averaged_from") or not _averaged_from_trained_packs(a["averaged_from"], dataset):
                return False
        elif not (a["command"].startswith("medseg train") and f"--dataset {dataset}" in a["command"]):
            return False
    return True


@pytest.mark.parametrize("pack_id", sorted(EXPECTED))
def test_manifest_records_what_the_issue_names(pack_id):
    require_shipped(pack_id)
    pack = shipped_pack(pack_id)
    recipe = get_recipe(EXPECTED[pack_id])
    m = pack.manifest
    assert m["id"] == pack_id
    # the network and how to feed it
    assert m["architecture"] and m["config"] in ("small", "full")
    assert m["in_channels"] == recipe.in_channels
    assert m["normalisation"]["kind"] == recipe.normalisation["kind"]
    # classes: values, names and colours
    assert [c["value"] for c in m["classes"]] == list(range(recipe.num_classes))
    assert [c["name"] for c in m["classes"]] == list(recipe.class_names)
    assert all(re.fullmatch(r"#[0-9a-fA-F]{6}", c["color"]) for c in m["classes"])
    # the pixel size: required where the recipe works in physical units, recorded (possibly null) elsewhere
    assert "mpp" in m
    if recipe.mpp is not None:
        assert m["mpp"] == pytest.approx(recipe.mpp)
    # training data, split and the exact command
    t = m["training"]
    assert t["dataset"] == recipe.name and t["split_rule"] and t["train_cases"] > 0 and t["val_cases"] > 0
    if m.get("averaged_from"):  # written by 'medseg average' from packs that were each trained on the dataset
        assert m["command"].startswith("medseg average") and len(m["averaged_from"]) >= 2
        assert sum(a["weight"] for a in m["averaged_from"]) == pytest.approx(1.0)
        assert _averaged_from_trained_packs(m["averaged_from"], recipe.name)
    else:
        assert m["command"].startswith("medseg train") and f"--dataset {recipe.name}" in m["command"]
    # validation metrics on the validation split
    metrics = m["metrics"]
    assert metrics["split"] == "val" and metrics["n_cases"] > 0
    for name in recipe.class_names[1:]:
        assert 0.0 <= metrics["dice"][name] <= 1.0
    if recipe.objects:
        assert 0.0 <= metrics["object_f1"] <= 1.0
    if recipe.biometry:
        assert "aop_error_deg" in metrics
    # weights: verified hash, fp16 and small
    assert re.fullmatch(r"[0-9a-f]{64}", m["weights"]["sha256"])
    assert m["weights"]["dtype"] == "float16"
    assert (pack.path / m["weights"]["file"]).stat().st_size < MAX_WEIGHTS_MIB * 2**20
    # licence and attribution of the training data
    assert m["licence"] and m["attribution"]


@pytest.mark.parametrize("pack_id", sorted(EXPECTED))
def test_pack_segments_real_validation_images_well_above_chance(pack_id):
    require_shipped(pack_id)
    recipe = get_recipe(EXPECTED[pack_id])
    data_dir(recipe.folder)
    pack = shipped_pack(pack_id)
    cases = evenly(recipe.cases("val"), N_IMAGES)
    report = run(evaluate_iter(pack, recipe, cases, options=EvalOptions(distances=False, biometry=False), split="val"))
    classes = list(recipe.class_names[1:])
    dice = float(np.mean([report["structures"][c]["dice"]["mean"] for c in classes]))
    # chance: guessing every pixel as the class, or every pixel as background (Dice 1 only on empty references)
    guess_all, guess_none = [], []
    for case in cases:
        ref = read_mask(case, recipe.num_classes)
        for value in range(1, recipe.num_classes):
            area = int(np.count_nonzero(ref == value))
            guess_all.append(2 * area / (area + ref.size))
            guess_none.append(1.0 if area == 0 else 0.0)
    chance = max(float(np.mean(guess_all)), float(np.mean(guess_none)))
    assert dice >= 0.5, f"{pack_id}: mean foreground Dice {dice:.3f} on {len(cases)} validation images"
    assert dice >= chance + 0.3, f"{pack_id}: mean foreground Dice {dice:.3f} is not far above chance ({chance:.3f})"
