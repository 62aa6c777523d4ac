"""`medseg wsi` end to end in a subprocess: zarr pyramid, CSV and GeoJSON, resume, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from tests.slide_fixtures import TILE_MPP, unet_rgb_pack, write_mosaic_slide


def medseg(*args: str, models: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEDSEG_MODELS=str(models))
    return subprocess.run([sys.executable, "-m", "medseg.cli", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from medseg.train.packs import save_pack

    root = tmp_path_factory.mktemp("cli-wsi")
    slide, img, _ = write_mosaic_slide(root, rows=1, cols=2, tile=128, gap=32)
    pack = unet_rgb_pack(tile=64, balance_on=img[32:160, 32:160])
    pack.manifest = {"postprocess": {"min_object_area_um2": 50.0}}
    save_pack(pack, root / "packs" / pack.id)
    return root, slide


def test_wsi_writes_zarr_csv_and_geojson(setup):
    root, slide = setup
    out = root / "out.zarr"
    run = medseg("wsi", str(slide), "--model", "test-unet-rgb", "-o", str(out), "--csv", str(root / "o.csv"), "--geojson", str(root / "o.geojson"),
                 "--object-type", "annotation", "--device", "cpu", models=root / "packs")
    assert run.returncode == 0, run.stderr
    assert "level 0 (352 x 192 px, 1.700 µm/px)" in run.stderr and "objects" in run.stderr
    group = zarr.open_group(str(out), mode="r")
    assert group["labels/0"].shape == (192, 352) and group.attrs["medseg"]["complete"]
    assert group.attrs["medseg"]["mpp"] == pytest.approx(TILE_MPP)
    rows = (root / "o.csv").read_text().splitlines()
    data = json.loads((root / "o.geojson").read_text(encoding="utf-8"))
    assert rows[0].startswith("id,class,centroid_x") and len(rows) - 1 == len(data["features"])
    assert all(f["properties"]["measurements"]["Area µm^2"] >= 50.0 for f in data["features"])  # the pack's minimum area
    assert {f["properties"]["objectType"] for f in data["features"]} == {"annotation"} and data["medseg"]["mpp"] == pytest.approx(TILE_MPP)

    again = medseg("wsi", str(slide), "--model", "test-unet-rgb", "-o", str(out), "--device", "cpu", models=root / "packs")
    assert again.returncode == 0 and "0 tiles predicted" in again.stderr  # finished runs are not redone


def test_wsi_errors_are_one_line(setup):
    root, slide = setup
    missing = medseg("wsi", str(root / "nope.svs"), "--model", "test-unet-rgb", "-o", str(root / "x.zarr"), models=root / "packs")
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "does not exist" in missing.stderr
    bad = medseg("wsi", str(slide), "--model", "test-unet-rgb", "-o", str(root / "x.zarr"), "--region", "1,2,3", models=root / "packs")
    assert bad.returncode == 2 and "X,Y,W,H" in bad.stderr
    out = root / "y.zarr"
    assert medseg("wsi", str(slide), "--model", "test-unet-rgb", "-o", str(out), "--tile", "64", "--device", "cpu", models=root / "packs").returncode == 0
    other = medseg("wsi", str(slide), "--model", "test-unet-rgb", "-o", str(out), "--tile", "32", "--device", "cpu", models=root / "packs")
    assert other.returncode == 2 and "already holds a different run" in other.stderr
