"""`medseg correct --export` and the refusals of `medseg correct` / `medseg finetune`."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import tifffile

from medseg.cli import main
from tests.annotate._shapes import scene


def test_correct_export_without_viewer(tmp_path, capsys):
    image = tmp_path / "img.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "m.tif", scene())
    assert main(["correct", str(image), "--mask", str(tmp_path / "m.tif"), "--export", str(tmp_path / "out"), "--formats", "tif,zarr,summary"]) == 0
    assert "started" in capsys.readouterr().err
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "corrected.tif"), scene())
    assert json.loads((tmp_path / "out" / "corrected_summary.json").read_text())["unreviewed"] == 4
    import zarr

    assert np.array_equal(zarr.open_array(str(tmp_path / "out" / "corrected.zarr"))[...], scene())
    assert main(["correct", str(image), "--export", str(tmp_path / "out"), "--formats", "csv"]) == 0
    assert "reopened" in capsys.readouterr().err


def test_refusals(tmp_path, capsys):
    assert main(["correct", str(tmp_path / "none.png"), "--mask", "m.tif"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["correct", "a.png", "--mask", "m.tif", "--pack", "p"]) == 2
    assert main(["finetune", "--pack", "kidney-glomeruli", "--session", str(tmp_path)]) == 2
    assert "--steps or --minutes" in capsys.readouterr().err
    assert main(["finetune", "--pack", "kidney-glomeruli", "--session", str(tmp_path), "--steps", "1"]) == 1
    assert "not a correction session" in capsys.readouterr().err


def test_finetune_refuses_a_session_both_trained_and_held_out(tmp_path, capsys):
    image = tmp_path / "img.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "m.tif", scene())
    assert main(["correct", str(image), "--mask", str(tmp_path / "m.tif"), "--export", str(tmp_path / "out"), "--formats", "csv"]) == 0
    session = tmp_path / "img.correct"
    assert session.is_dir()
    capsys.readouterr()
    assert main(["finetune", "--pack", "kidney-glomeruli", "--session", str(session), "--val-session", str(tmp_path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "both to train on and to validate on" in err and len(err.strip().splitlines()) == 1


def test_corrected_dataset_is_written_afresh(tmp_path):
    """A second fine-tuning run in the same folder trains on its own sessions only, not on tiles left by the first."""
    from medseg.annotate.finetune import corrected_dataset
    from medseg.train.datasets import folder_cases

    sessions = []
    for k in range(2):
        image = tmp_path / f"img{k}.png"
        iio.imwrite(image, np.random.default_rng(k).integers(0, 255, (120, 160, 3), dtype=np.uint8))
        tifffile.imwrite(tmp_path / "m.tif", scene())
        assert main(["correct", str(image), "--mask", str(tmp_path / "m.tif"), "--export", str(tmp_path / f"out{k}"), "--formats", "csv"]) == 0
        sessions.append(tmp_path / f"img{k}.correct")
    folder, tiles = corrected_dataset(sessions, tmp_path / "corrected", None)
    assert len(folder_cases(folder)) == len(tiles) == 2
    folder, tiles = corrected_dataset(sessions[1:], tmp_path / "corrected", None)
    cases = folder_cases(folder)
    assert len(cases) == len(tiles) == 1 and cases[0].split == "train" and cases[0].mpp is None
    assert np.array_equal(iio.imread(cases[0].mask), (scene() > 0).astype(np.uint8))
