"""`medseg biometry` end to end in a subprocess: reference masks (--masks), a pack (--model) on images,
a multi-frame DICOM and a video, the CSV, partial failures and bad usage."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from imageio import v3 as iio

from medseg.measure.biometry import aop_hsd
from medseg.measure.ellipse import aop_hsd_ellipse
from tests.cli.test_cli_segment import medseg
from tests.conftest import data_dir

IDS = ["03744", "04510", "04856"]  # 04856 has no tangent under the contour rules


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_masks_of_real_psfhs_frames_both_methods(tmp_path):
    root = data_dir("psfhs")
    images = [str(root / "images" / f"{i}.png") for i in IDS]
    out = tmp_path / "contour.csv"
    r = medseg("biometry", *images, "--masks", str(root / "labels"), "--csv", str(out))
    assert r.returncode == 0, r.stderr
    rows = read_csv(out)
    assert [row["stem"] for row in rows] == IDS and {row["frame"] for row in rows} == {"0"}
    assert {"stem", "frame", "aop_deg", "hsd_px", "hsd_mm", "status", "reason"} <= set(rows[0])
    for row in rows:
        ref = aop_hsd(iio.imread(root / "labels" / f"{row['stem']}.png"))
        assert row["status"] == ref.status and row["method"] == "contour" and row["hsd_mm"] == ""
        assert float(row["hsd_px"]) == pytest.approx(ref.hsd)
        if ref.ok:
            assert float(row["aop_deg"]) == pytest.approx(ref.aop) and row["reason"] == ""
        else:
            assert row["aop_deg"] == "" and "tangent" in row["reason"]
    assert "2 of 3 frames measured" in r.stderr and "no_tangent 1" in r.stderr

    out = tmp_path / "ellipse.csv"
    r = medseg("biometry", *images, "--masks", str(root / "labels"), "--csv", str(out), "--method", "ellipse", "--spacing", "0.2")
    assert r.returncode == 0, r.stderr
    for row in read_csv(out):
        ref = aop_hsd_ellipse(iio.imread(root / "labels" / f"{row['stem']}.png"), spacing=(0.2, 0.2))
        assert row["status"] == ref.status and row["method"] == "ellipse"
        if ref.ok:
            assert float(row["aop_deg"]) == pytest.approx(ref.aop) and float(row["hsd_mm"]) == pytest.approx(ref.hsd_mm)


def test_masks_folder_alone_and_a_stack_mask(tmp_path):
    import tifffile

    root = data_dir("psfhs")
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in IDS[:2]:
        shutil.copy(root / "labels" / f"{i}.png", masks / f"{i}.png")
    stack = np.stack([iio.imread(root / "labels" / f"{i}.png") for i in IDS])
    stack[1] = 0  # an empty frame in the middle of a loop
    tifffile.imwrite(masks / "loop.tif", stack)
    out = tmp_path / "all.csv"
    r = medseg("biometry", "--masks", str(masks), "--csv", str(out), "--grid", "512")
    assert r.returncode == 0, r.stderr
    rows = read_csv(out)
    assert [(row["stem"], row["frame"]) for row in rows] == [("03744", "0"), ("04510", "0"), ("loop", "0"), ("loop", "1"), ("loop", "2")]
    assert rows[3]["status"] == "no_symphysis" and rows[3]["plane"] == "none"
    assert float(rows[1]["hsd_px"]) == pytest.approx(2 * 60.083, rel=0.03)  # pixels of the 512 grid


def test_a_missing_mask_fails_that_input_only(tmp_path):
    root = data_dir("psfhs")
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(root / "labels" / "04510.png", masks / "04510.png")
    out = tmp_path / "t.csv"
    r = medseg("biometry", str(root / "images" / "04510.png"), str(root / "images" / "03744.png"), "--masks", str(masks), "--csv", str(out))
    assert r.returncode == 1 and "No mask for '03744'" in r.stderr and "1 of 2 inputs failed" in r.stderr
    assert [row["stem"] for row in read_csv(out)] == ["04510"]


def test_model_on_an_image_a_multi_frame_dicom_and_a_video(tmp_path, saved_pack, rng):
    from scipy.ndimage import gaussian_filter

    from tests.io.test_dicom_video import write_dicom, write_video

    frames = (gaussian_filter(rng.random((3, 64, 80)), sigma=(0, 3, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "single.png", frames[0])
    write_dicom(tmp_path / "loop.dcm", frames, spacing=(0.3, 0.3))
    write_video(tmp_path / "clip.mp4", np.repeat(frames[..., None], 3, -1))
    out = tmp_path / "model.csv"
    segs = tmp_path / "segs"
    r = medseg("biometry", str(tmp_path / "single.png"), str(tmp_path / "loop.dcm"), str(tmp_path / "clip.mp4"), "--model", "test-unet",
               "--csv", str(out), "-o", str(segs), "--tile", "64", "--device", "cpu", env_models=saved_pack.parent)
    assert r.returncode == 0, r.stderr
    rows = read_csv(out)
    assert [(row["stem"], row["frame"]) for row in rows] == [("single", "0")] + [("loop", str(i)) for i in range(3)] + [("clip", str(i)) for i in range(3)]
    assert all(row["status"] for row in rows)  # an untrained pack: measured or not, never an exception
    for row in rows:
        if row["stem"] == "loop" and row["hsd_px"]:
            assert float(row["hsd_mm"]) == pytest.approx(0.3 * float(row["hsd_px"]))  # the DICOM's pixel spacing
    assert (segs / "single.png").exists() and (segs / "loop.tif").exists() and (segs / "clip.tif").exists()


def test_bad_usage(tmp_path):
    r = medseg("biometry", "x.png", "--csv", str(tmp_path / "a.csv"))
    assert r.returncode == 2 and "--model" in r.stderr and "--masks" in r.stderr
    r = medseg("biometry", "--masks", str(tmp_path), "--csv", str(tmp_path / "a.csv"), "--spacing", "abc")
    assert r.returncode == 2 and "--spacing" in r.stderr
    r = medseg("biometry", "--masks", str(tmp_path), "--csv", str(tmp_path / "a.csv"), "--method", "hough")
    assert r.returncode == 2
    r = medseg("biometry", "--masks", str(tmp_path / "nowhere"), "--csv", str(tmp_path / "a.csv"))
    assert r.returncode == 1 and "not a folder" in r.stderr
    assert not (tmp_path / "a.csv").exists()
