"""`medseg click` end to end: a real ultrasound frame, the shipped pack, clicks in order, a 0/1 mask."""

from __future__ import annotations

import subprocess
import sys

import imageio.v3 as iio
import numpy as np

from medseg.cli import main
from medseg.metrics import iou
from tests.conftest import data_dir


def _truth(root, name):
    from medseg.train.datasets import Case, read_mask

    return read_mask(Case(name, root / "images" / f"{name}.png", root / "labels" / f"{name}.png"), 3)


def test_click_writes_the_object_under_the_clicks(tmp_path):
    root = data_dir("psfhs")
    truth = _truth(root, "04400")
    fr, fc = np.argwhere(truth == 2).mean(axis=0)
    pr, pc = np.argwhere(truth == 1).mean(axis=0)
    out = tmp_path / "sub" / "head.png"
    points = f"{fc:.0f},{fr:.0f},+;{pc:.0f},{pr:.0f},+;{pc:.0f},{pr:.0f},-"
    proc = subprocess.run([sys.executable, "-m", "medseg.cli", "click", str(root / "images" / "04400.png"), "--model", "ultrasound-fhps", "--points", points, "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    mask = iio.imread(out)
    assert mask.dtype == np.uint8 and mask.shape == truth.shape and set(np.unique(mask)) == {0, 1}
    assert iou(mask == 1, truth == 2) > 0.8 and not ((mask == 1) & (truth == 1)).any()
    assert "click fallback" in proc.stderr and not list(out.parent.glob("*.tmp*"))


def test_click_refuses_bad_points_and_clicks_off_the_image(tmp_path, capsys):
    root = data_dir("psfhs")
    image = str(root / "images" / "04400.png")
    out = tmp_path / "m.png"
    assert main(["click", image, "--model", "ultrasound-fhps", "--points", "10;20", "-o", str(out)]) == 2
    assert "is not a click" in capsys.readouterr().err
    assert main(["click", image, "--model", "ultrasound-fhps", "--points", "10,20,+;400,3,-", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "outside the image (256 x 256 pixels)" in err and err.count("\n") == 1
    assert not out.exists()
    flat = tmp_path / "flat.png"
    iio.imwrite(flat, np.full((64, 64), 9, np.uint8))
    assert main(["click", str(flat), "--model", "ultrasound-fhps", "--points", "3,3", "-o", str(out)]) == 1
    assert "empty" in capsys.readouterr().err and not out.exists()


def test_click_with_a_box_only_and_without_anything(tmp_path, capsys):
    root = data_dir("psfhs")
    image = str(root / "images" / "04400.png")
    truth = _truth(root, "04400")
    rows, cols = np.nonzero(truth == 1)
    box = f"{cols.min() - 5},{rows.min() - 5},{cols.max() + 5},{rows.max() + 5}"
    out = tmp_path / "ps.png"
    assert main(["click", image, "--model", "ultrasound-fhps", "--box", box, "-o", str(out)]) == 0
    mask = iio.imread(out) == 1
    assert iou(mask, truth == 1) > 0.6 and not (mask & (truth == 2)).any()
    assert main(["click", image, "--model", "ultrasound-fhps", "-o", str(out)]) == 2
    assert "at least one click" in capsys.readouterr().err
