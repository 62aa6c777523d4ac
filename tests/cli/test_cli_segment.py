"""`medseg` end to end in a subprocess: segment, models, info, exit codes, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from imageio import v3 as iio

from tests.conftest import data_dir


def medseg(*args: str, env_models: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_models is not None:
        env["MEDSEG_MODELS"] = str(env_models)
    return subprocess.run([sys.executable, "-m", "medseg.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def packs_dir(saved_pack) -> Path:
    return saved_pack.parent


def test_segment_real_ultrasound_frames_and_a_stack(tmp_path, packs_dir):
    images = data_dir("psfhs") / "images"
    frames = sorted(images.glob("*.png"))[:2]
    stack = np.stack([iio.imread(f) for f in frames])
    tifffile.imwrite(tmp_path / "loop.tif", stack)
    out = tmp_path / "out"
    r = medseg("segment", str(frames[0]), str(frames[1]), str(tmp_path / "loop.tif"), "--model", "test-unet", "-o", str(out), "--tile", "128", env_models=packs_dir)
    assert r.returncode == 0, r.stderr
    for f in frames:
        mask = iio.imread(out / f"{f.stem}.png")
        assert mask.dtype == np.uint8 and mask.shape == iio.imread(f).shape
        assert set(np.unique(mask)) <= {0, 1, 2}
    loop = tifffile.imread(out / "loop.tif")
    assert loop.shape == stack.shape and loop.dtype == np.uint8
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_segment_a_folder(tmp_path, packs_dir, rng):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        iio.imwrite(src / f"img{i}.png", rng.integers(0, 255, (40, 50), dtype=np.uint8))
    r = medseg("segment", str(src), "-m", "test-unet", "-o", str(tmp_path / "o"), env_models=packs_dir)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img0.png", "img1.png"]


@pytest.mark.parametrize(
    "make, expected, code",
    [
        (lambda d: d / "missing.png", "does not exist", 1),
        (lambda d: ((d / "bad.png").write_bytes(b"\x89PNG not really"), d / "bad.png")[1], "not an image medseg can read", 1),
        (lambda d: (tifffile.imwrite(d / "vol.tif", np.zeros((2, 3, 20, 20, 2), np.uint8)), d / "vol.tif")[1], "5-D", 1),
        (lambda d: (iio.imwrite(d / "flat.png", np.full((30, 30), 9, np.uint8)), d / "flat.png")[1], "constant", 1),
        (lambda d: (iio.imwrite(d / "rgb.png", np.zeros((30, 30, 3), np.uint8) + np.arange(30, dtype=np.uint8)[:, None, None]), d / "rgb.png")[1], None, 0),
    ],
)
def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, packs_dir, make, expected, code):
    path = make(tmp_path)
    out = tmp_path / "out"
    r = medseg("segment", str(path), "-m", "test-unet", "-o", str(out), env_models=packs_dir)
    assert r.returncode == code, r.stderr
    if expected is None:  # an RGB image into a grey model is converted, not refused
        assert (out / "rgb.png").exists()
        return
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_unknown_model_is_bad_usage(tmp_path, packs_dir):
    img = tmp_path / "a.png"
    iio.imwrite(img, np.arange(100, dtype=np.uint8).reshape(10, 10))
    r = medseg("segment", str(img), "-m", "no-such-pack", "-o", str(tmp_path / "o"), env_models=packs_dir)
    assert r.returncode == 2 and "No pack named 'no-such-pack'" in r.stderr
    r = medseg("segment", str(img), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "--model" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path, packs_dir):
    r = medseg("--debug", "segment", str(tmp_path / "nope.png"), "-m", "test-unet", "-o", str(tmp_path), env_models=packs_dir)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_models_and_info(packs_dir):
    r = medseg("models", "--json", env_models=packs_dir)
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert "test-unet" in [p["id"] for p in listing["packs"]]
    assert "unet" in [a["name"] for a in listing["architectures"]]
    r = medseg("info", "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["torch"].startswith("2.13") and "cpu" in info["devices"]
    assert "openslide" in info and "qt" in info
