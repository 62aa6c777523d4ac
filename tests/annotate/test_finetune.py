"""Fine-tuning on a few corrected real glomeruli tiles lowers the validation loss.

The pack fine-tuned is a glomeruli pack trained on one centre only: the shipped pack's network, recipe and
augmentation, trained for 20 minutes on the HuBMAP section of the glomeruli training split alone, last
weights kept (``tests/annotate/packs/kidney-glomeruli-hubmap``; its manifest holds the command). It meets
the AIDPATH biopsies of the training split as an annotator's new material: the pack predicts their
objects, the corrections are scripted from the reference masks (reject what misses every glomerulus,
repaint the outlines), six tiles are trained on and the four with the highest ids are held out. Nothing
here touches the validation split except to measure it, or the test splits at all.
(The shipped kidney-glomeruli pack has been trained on every training tile and chosen on the validation
split, so its own tiles carry nothing new for it; see the README.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medseg.annotate.finetune import bump_version, finetune_iter
from medseg.annotate.scripted import correct_to_reference
from medseg.annotate.sources import open_session_iter
from medseg.engine import run_sync
from medseg.errors import UsageError
from medseg.train.datasets import read_mask
from medseg.train.recipes import RECIPES
from tests.conftest import data_dir

ONE_CENTRE_PACK = Path(__file__).parent / "packs" / "kidney-glomeruli-hubmap"


def _sessions(cases, folder):
    out = []
    for case in cases:
        s = run_sync(open_session_iter(case.image, folder / f"{case.id}.correct", pack=str(ONE_CENTRE_PACK), mpp=case.mpp))
        correct_to_reference(s, read_mask(case, 2))
        assert s.counts()["unreviewed"] == 0
        out.append(s.folder)
        s.close()
    return out


@pytest.mark.slow
def test_finetune_on_corrected_tiles_of_a_new_centre_lowers_validation_loss(tmp_path):
    data_dir("glomeruli")
    torch.set_num_threads(1)
    recipe = RECIPES["glomeruli"]
    aidpath = sorted((c for c in recipe.cases("train") if c.source == "aidpath-kaggle"), key=lambda c: c.id)
    assert len(aidpath) == 10
    train = _sessions(aidpath[:6], tmp_path / "corrected")
    held_out = _sessions(aidpath[6:], tmp_path / "held-out")
    with pytest.raises(UsageError, match="both to train on and to validate on"):
        run_sync(finetune_iter(ONE_CENTRE_PACK, train, val_sessions=[held_out[0], train[1]], steps=2, workdir=tmp_path / "refused"))

    result = run_sync(finetune_iter(ONE_CENTRE_PACK, train, val_sessions=[tmp_path / "held-out"], steps=60, lr=1e-4, threads=1, workdir=tmp_path / "work"))
    manifest = json.loads((result.pack_path / "manifest.json").read_text())
    ref = manifest["reference_validation"]
    print(f"held-out corrections: loss {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}, Dice {manifest['finetuned_from']['metrics']['dice']} -> "
          f"{manifest['metrics']['dice']}, F1 {manifest['finetuned_from']['metrics']['object_f1']} -> {manifest['metrics']['object_f1']}; validation split: "
          f"loss {ref['validation_loss_before']:.4f} -> {ref['validation_loss_after']:.4f}, Dice {ref['metrics_before']['dice']} -> {ref['metrics_after']['dice']}")
    assert result.tiles == 6 and result.steps == 60 and result.validation == "4 held-out corrected session(s)"
    # the validation loss falls on the held-out corrected tiles and on the glomeruli validation split
    assert result.val_loss_after < result.val_loss_before - 0.1, (result.val_loss_before, result.val_loss_after)
    assert ref["validation_loss_after"] < ref["validation_loss_before"] - 0.05, ref
    assert manifest["metrics"]["dice"]["glomerulus"] > manifest["finetuned_from"]["metrics"]["dice"]["glomerulus"] + 0.1
    assert ref["metrics_after"]["dice"]["glomerulus"] > ref["metrics_before"]["dice"]["glomerulus"]
    # what the new version records, next to the old one's numbers measured on the same tiles
    assert manifest["version"] == result.version == bump_version("1.0.0") == "1.1.0"
    assert manifest["finetuned_from"]["id"] == "kidney-glomeruli-hubmap"
    assert manifest["finetuned_from"]["validation_loss"] == pytest.approx(result.val_loss_before, abs=1e-4)
    assert manifest["validation_loss"] == pytest.approx(result.val_loss_after, abs=1e-4)
    assert manifest["metrics"]["n_cases"] == manifest["finetuned_from"]["metrics"]["n_cases"] == 4
    assert sorted(manifest["corrections"]["held_out_sessions"]) == sorted(str(p.resolve()) for p in held_out)
    assert ref["cases"] == len(recipe.cases("val")) == ref["metrics_after"]["n_cases"]
    assert ref["metrics_before"] == json.loads((ONE_CENTRE_PACK / "manifest.json").read_text())["metrics"]
    assert manifest["training"]["config"]["train_folder"].endswith("corrected") and manifest["training"]["config"]["val_folder"].endswith("corrected-val")
    assert manifest["training"]["augmentation"]["scale"] == [1.0, 1.0] and manifest["training"]["crop"] == recipe.tile  # light: flips and 90° turns, whole tiles
