"""scripts/copy_training_data.py: the copy holds every training row, the asked validation rows spread
evenly, no held-out row, and the recipes read it as they read the shared folder."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from medseg.train.recipes import get_recipe
from tests.conftest import data_dir

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "copy_training_data.py"


def _script():
    spec = importlib.util.spec_from_file_location("copy_training_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r.get("shipped", "1") in ("1", "true", "True")]


def test_the_copy_keeps_training_rows_and_thins_validation(tmp_path, capsys):
    script = _script()
    shared = data_dir("polyp").parent
    data_dir("psfhs")
    assert script.main([str(tmp_path), "--data-root", str(shared), "--val", "6", "--val-per-source", "kvasir=4,cvc=2"]) == 0
    for name, table in (("psfhs", "frames.csv"), ("polyp", "splits.csv")):
        copied, original = _rows(tmp_path / name / table), _rows(shared / name / table)
        assert [r for r in copied if r["split"] == "train"] == [r for r in original if r["split"] == "train"]
        assert sum(r["split"] == "val" for r in copied) == 6 and {r["split"] for r in copied} == {"train", "val"}
        recipe = get_recipe(name)
        val = recipe.cases("val", data_root=tmp_path)
        assert len(val) == 6 and all(c.image.is_file() and c.mask.is_file() for c in val)
        assert len(recipe.cases("train", data_root=tmp_path)) == len(recipe.cases("train", data_root=shared))
    polyp_val = [r["dataset"] for r in _rows(tmp_path / "polyp" / "splits.csv") if r["split"] == "val"]
    assert sorted(polyp_val) == ["cvc", "cvc", "kvasir", "kvasir", "kvasir", "kvasir"]
    assert script.main([str(tmp_path / "x"), "--data-root", str(shared), "--val-per-source", "kvasir=x"]) == 2
    assert "SOURCE=N" in capsys.readouterr().err
