"""Fine-tuning on a few corrected real glomeruli tiles lowers the validation loss.

The tiles come from the glomeruli training split; the shipped glomeruli pack predicts their objects
and the corrections are scripted from the reference masks (reject what misses every glomerulus,
repaint the outlines). The pack fine-tuned here is one that has not been trained on these tiles: the
shipped colon-polyp network (same architecture and normalisation) declared as a glomeruli pack, as
when a pack is adapted to a new tissue. (The shipped glomeruli pack was chosen on this validation
split after training on these very tiles, so a minute more on them cannot be expected to lower it.)
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medseg import metrics
from medseg.annotate.finetune import bump_version, finetune_iter
from medseg.annotate.sources import open_session_iter
from medseg.engine import run_sync
from medseg.errors import UsageError
from medseg.train.datasets import evenly, read_mask
from medseg.train.packs import find_pack
from medseg.train.recipes import RECIPES
from tests.conftest import data_dir


def _correct_to_reference(session, reference: np.ndarray) -> None:
    """What an annotator does: reject predicted objects that miss every glomerulus, then repaint the tile
    so that the objects follow the reference outlines (new ids for glomeruli the model missed)."""
    ref_ids = metrics.instances(reference > 0)
    for oid in session.order():
        session.goto(oid)
        obj = session.objects[oid]
        y0, x0, y1, x1 = obj.box
        if not (reference[y0:y1, x0:x1][session.labels[y0:y1, x0:x1] == oid]).any():
            session.reject()
    base = session.new_id()
    session.paint(0, 0, np.where(ref_ids > 0, ref_ids + base, 0).astype(np.uint32))


def _glomeruli_pack_from_polyp(folder):
    """The colon-polyp pack's files with a manifest that declares it a glomeruli pack (weights untouched)."""
    recipe = RECIPES["glomeruli"]
    shutil.copytree(find_pack("colon-polyp"), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update({"id": "glomeruli-start", "version": "1.0.0", "mpp": recipe.mpp, "tile": recipe.tile,
                     "classes": [c.to_dict() for c in recipe.classes()], "metrics": {},
                     "training": dict(manifest["training"], dataset="glomeruli")})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.slow
def test_finetune_on_corrected_tiles_lowers_validation_loss(tmp_path):
    data_dir("glomeruli")
    torch.set_num_threads(1)
    recipe = RECIPES["glomeruli"]
    cases = evenly(recipe.cases("train"), 3)
    sessions = []
    for case in cases:
        s = run_sync(open_session_iter(case.image, tmp_path / f"{case.id}.correct", pack="kidney-glomeruli", mpp=case.mpp))
        _correct_to_reference(s, read_mask(case, 2))
        assert s.counts()["unreviewed"] == 0
        sessions.append(s.folder)
        s.close()
    start = _glomeruli_pack_from_polyp(tmp_path / "glomeruli-start")
    result = run_sync(finetune_iter(start, sessions, steps=16, lr=3e-4, threads=1, workdir=tmp_path / "work", replay=False, freeze_norm=False))
    assert result.tiles == 3 and result.steps == 16
    assert result.val_loss_after < result.val_loss_before, (result.val_loss_before, result.val_loss_after)
    manifest = json.loads((result.pack_path / "manifest.json").read_text())
    assert manifest["version"] == result.version == bump_version("1.0.0") == "1.1.0"
    assert manifest["finetuned_from"]["id"] == "glomeruli-start" and manifest["finetuned_from"]["validation_loss"] == pytest.approx(result.val_loss_before, abs=1e-4)
    assert manifest["validation_loss"] == pytest.approx(result.val_loss_after, abs=1e-4)
    assert manifest["metrics"]["n_cases"] == len(recipe.cases("val")) and "dice" in manifest["metrics"]
    assert manifest["training"]["config"]["train_folder"].endswith("corrected")


AACHEN_TRAIN = ("aachen_mouse_adenine", "aachen_mouse_ntn", "aachen_mouse_uuo")
AACHEN_HELD_OUT = ("aachen_mouse_healthy", "aachen_mouse_alport", "aachen_mouse_iri")


@pytest.mark.slow
def test_finetune_shipped_pack_on_new_tissue_lowers_held_out_validation_loss(tmp_path):
    """The shipped kidney-glomeruli pack (human biopsies) meets mouse kidney: an annotator corrects its
    objects on three mouse tiles and holds three others out for validation (one tile per disease model,
    different models on each side). Fine-tuning on the three corrected tiles lowers the validation loss
    on the three held-out ones; the pack's own validation split is measured before and after as well and
    recorded next to it (what the new version forgets of human biopsies), not asserted to improve."""
    data_dir("glomeruli")
    torch.set_num_threads(1)
    recipe = RECIPES["glomeruli"]
    by_id = {c.id: c for c in recipe.cases("external-test")}

    def corrected(ids, folder):
        out = []
        for cid in ids:
            case = by_id[cid]
            s = run_sync(open_session_iter(case.image, folder / f"{cid}.correct", pack="kidney-glomeruli", mpp=case.mpp))
            _correct_to_reference(s, read_mask(case, 2))
            out.append(s.folder)
            s.close()
        return out

    train = corrected(AACHEN_TRAIN, tmp_path / "train")
    held_out = corrected(AACHEN_HELD_OUT, tmp_path / "held-out")
    with pytest.raises(UsageError, match="both to train on and to validate on"):
        run_sync(finetune_iter("kidney-glomeruli", train, val_sessions=[held_out[0], train[1]], steps=2, workdir=tmp_path / "refused"))
    result = run_sync(finetune_iter("kidney-glomeruli", train, val_sessions=[tmp_path / "held-out"], steps=30, lr=1e-4, threads=1, workdir=tmp_path / "work"))
    assert result.tiles == 3 and result.steps == 30 and result.validation == "3 held-out corrected session(s)"
    assert result.val_loss_after < result.val_loss_before - 0.05, (result.val_loss_before, result.val_loss_after)
    manifest = json.loads((result.pack_path / "manifest.json").read_text())
    assert manifest["validation_loss"] == pytest.approx(result.val_loss_after, abs=1e-4)
    assert manifest["finetuned_from"]["validation_loss"] == pytest.approx(result.val_loss_before, abs=1e-4)
    assert manifest["metrics"]["n_cases"] == manifest["finetuned_from"]["metrics"]["n_cases"] == 3  # both on the held-out tiles
    assert sorted(manifest["corrections"]["held_out_sessions"]) == sorted(str(p.resolve()) for p in held_out)
    ref = manifest["reference_validation"]
    assert ref["cases"] == len(recipe.cases("val")) == ref["metrics_after"]["n_cases"]
    assert ref["validation_loss_before"] == pytest.approx(0.4917, abs=2e-3)  # the shipped pack on its validation split, as measured by validation_loss
    assert ref["metrics_before"] == find_manifest_metrics("kidney-glomeruli")
    print(f"held-out loss {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}; Dice {manifest['finetuned_from']['metrics']['dice']} -> {manifest['metrics']['dice']}; "
          f"validation split loss {ref['validation_loss_before']:.4f} -> {ref['validation_loss_after']:.4f}, Dice {ref['metrics_before']['dice']} -> {ref['metrics_after']['dice']}")


def find_manifest_metrics(pack_id):
    return json.loads((find_pack(pack_id) / "manifest.json").read_text())["metrics"]
