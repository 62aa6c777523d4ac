"""`medseg compare` end to end on real PSFHS frames: masks, agreement maps, table, figure; errors as one line."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from medseg.cli import main
from medseg.io import read_image, read_labels
from medseg.models import count_parameters
from medseg.train.packs import load_pack
from tests.conftest import data_dir

FRAMES = ("04400", "04510")


@pytest.fixture
def frames():
    folder = data_dir("psfhs")
    return [str(folder / "images" / f"{f}.png") for f in FRAMES], folder / "labels"


def read_table(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["model"]: r for r in csv.DictReader(fh)}


def test_compare_three_models_with_reference(frames, saved_pack, tmp_path, capsys):
    images, labels = frames
    out = tmp_path / "out"
    code = main(["compare", *images, "--models", f"ultrasound-fhps,{saved_pack},again=ultrasound-fhps", "--reference", str(labels),
                 "-o", str(out), "--device", "cpu", "--threads", "1", "--probabilities"])
    assert code == 0
    import tifffile

    probs = tifffile.imread(out / "ultrasound-fhps" / f"{FRAMES[0]}-probabilities.tif")
    assert probs.shape == (3, 256, 256) and probs.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=0.01)
    for model in ("ultrasound-fhps", "test-unet", "again"):
        for f in FRAMES:
            mask = read_labels(out / model / f"{f}.png")
            assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1, 2}
    for f in FRAMES:
        agreement = read_labels(out / "agreement" / f"{f}.png")
        assert agreement.min() >= 2 and agreement.max() == 3  # the shipped pack twice always agrees with itself
        picture = read_image(out / "disagreement" / f"{f}.png")
        assert picture.rgb and picture.array.shape == (256, 256, 3)
    table = read_table(out / "comparison.csv")
    assert list(table) == ["ultrasound-fhps", "test-unet", "again"]
    shipped = table["ultrasound-fhps"]
    assert float(shipped["Dice fetal head"]) > 0.8 and float(shipped["Dice pubic symphysis"]) > 0.6
    assert shipped["Dice fetal head"] == table["again"]["Dice fetal head"]
    assert float(table["test-unet"]["mean Dice"]) < float(shipped["mean Dice"])  # untrained
    assert float(shipped["params (M)"]) == pytest.approx(count_parameters(load_pack("ultrasound-fhps").model) / 1e6, abs=0.01) and float(shipped["seconds"]) > 0
    assert shipped["abs. ΔAoP °"] != ""
    with open(out / "pairwise.csv", encoding="utf-8") as fh:
        pairs = {r["model"]: r for r in csv.DictReader(fh)}
    assert float(pairs["ultrasound-fhps"]["again"]) == 1.0
    cases = list(csv.DictReader(open(out / "cases.csv", encoding="utf-8")))
    assert len(cases) == 6 and {c["image"] for c in cases} == set(FRAMES)
    md = (out / "comparison.md").read_text(encoding="utf-8")
    assert "| model | architecture |" in md and "Pairwise Dice" in md
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ultrasound-fhps |" in capsys.readouterr().out


def test_reference_equal_to_a_models_output_scores_one(frames, saved_pack, tmp_path):
    images, _ = frames
    first = tmp_path / "first"
    assert main(["compare", *images, "--models", f"ultrasound-fhps,{saved_pack}", "-o", str(first), "--device", "cpu"]) == 0
    table = read_table(first / "comparison.csv")
    assert "mean Dice" not in table["test-unet"]  # no reference: pairwise agreement only
    second = tmp_path / "second"
    assert main(["compare", *images, "--models", f"ultrasound-fhps,{saved_pack}", "--reference", str(first / "test-unet"),
                 "-o", str(second), "--device", "cpu", "--metric", "HD95 fetal head"]) == 0
    table = read_table(second / "comparison.csv")
    assert float(table["test-unet"]["mean Dice"]) == 1.0
    assert float(table["ultrasound-fhps"]["mean Dice"]) < 1.0


def test_errors_are_one_line(frames, tmp_path, capsys):
    images, labels = frames
    assert main(["compare", *images, "--models", "no-such-pack", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No pack named 'no-such-pack'" in err[0]
    assert main(["compare", *images, "--models", "ultrasound-fhps,colon-polyp", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same task" in err[0]
    assert main(["compare", *images, "--models", "ultrasound-fhps", "--reference", str(tmp_path), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No mask for" in err[0]
    assert main(["compare", images[0], "--models", "ultrasound-fhps", "--reference", str(labels), "--metric", "beauty",
                 "-o", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--metric 'beauty'" in err[-1]
