"""The headless demo (`python -m medseg.demo`, what `make demo` runs without a display) and the overlay
pictures it writes (medseg.io.overlay)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

# --------------------------------------------------------------------------- overlay
def test_overlay_fills_and_outlines_each_class_in_its_colour():
    from medseg.io.overlay import render_overlay

    image = np.full((20, 20), 100, np.uint8)
    labels = np.zeros((20, 20), np.uint8)
    labels[4:12, 4:12] = 1
    labels[14:18, 2:18] = 2

    out = render_overlay(image, labels, {1: "#ff0000", 2: (0, 255, 0)}, alpha=0.5)

    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # background untouched
    np.testing.assert_array_equal(out[8, 8], [178, 50, 50])  # fill: half grey, half red
    np.testing.assert_array_equal(out[4, 8], [255, 0, 0])  # outline at full colour
    np.testing.assert_array_equal(out[16, 10], [50, 178, 50])


def test_overlay_takes_rgb_and_wide_types_and_refuses_mismatched_masks():
    from medseg.errors import InputError
    from medseg.io.overlay import class_colours, render_overlay, to_display_rgb
    from medseg.train.packs import default_classes

    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[..., 2] = 200
    labels = np.zeros((8, 9), np.uint8)
    assert np.array_equal(render_overlay(rgb, labels, {}), rgb)  # nothing labelled, nothing drawn

    wide = np.linspace(0, 60000, 64, dtype=np.float32).reshape(8, 8).astype(np.uint16)
    shown = to_display_rgb(wide)
    assert shown.dtype == np.uint8 and shown[0, 0, 0] == 0 and shown[-1, -1, 0] == 255

    assert class_colours(default_classes(3)) == {0: "#000000", 1: "#e6194b", 2: "#3cb44b"}
    with pytest.raises(InputError, match="mask of this image"):
        render_overlay(rgb, np.zeros((4, 4), np.uint8), {})
    with pytest.raises(InputError, match="hex colour"):
        render_overlay(rgb, labels + 1, {1: "red-ish"})


# --------------------------------------------------------------------------- the demo
@pytest.fixture
def two_samples():
    """A small ultrasound frame and a 512 px PAS tile (the 1024 px tile would only make the test slower)."""
    from medseg.demo import load_samples

    samples = {s.key: s for s in load_samples()}
    return [samples["psfhs_04400"], samples["hubmap_ccf_x04096_y01024"]]


def test_samples_are_listed_with_their_packs():
    from medseg.demo import load_samples

    samples = load_samples()
    assert len(samples) >= 3
    assert {s.pack for s in samples} == {"ultrasound-fhps", "kidney-glomeruli"}
    assert all(s.path.is_file() for s in samples)
    glom = {s.key: s for s in samples}
    assert glom["aidpath_10172"].pixel_size == 0.5 and glom["hubmap_ccf_x04096_y01024"].pixel_size == 0.85


def test_demo_writes_masks_and_overlays_and_says_where(tmp_path, saved_pack, two_samples):
    import imageio.v3 as iio

    from medseg.demo import run_demo
    from medseg.engine import PredictConfig, Predictor
    from medseg.io import read_image
    from medseg.train.packs import resolve

    said: list[str] = []
    samples = [replace(s, pack="test-unet") for s in two_samples]  # the sample -> pack mapping, overridden
    written = run_demo(tmp_path / "out", samples=samples, device="cpu", say=said.append)

    expected = sorted(f"{s.stem}_{kind}.png" for s in samples for kind in ("mask", "overlay"))
    assert sorted(p.name for p in written) == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == expected  # nothing half-written left over
    pack = resolve("test-unet")
    for s in samples:
        image = read_image(s.path)
        mask = iio.imread(tmp_path / "out" / f"{s.stem}_mask.png")
        overlay = iio.imread(tmp_path / "out" / f"{s.stem}_overlay.png")
        assert mask.dtype == np.uint8 and mask.shape == image.array.shape[:2]
        reference = Predictor(pack, PredictConfig(tile=pack.tile, overlap=pack.overlap, device="cpu")).predict(image).labels
        np.testing.assert_array_equal(mask, reference)
        assert overlay.shape == (*image.array.shape[:2], 3) and overlay.dtype == np.uint8
    assert str((tmp_path / "out").resolve()) in said[-1]


def test_demo_without_packs_says_so_in_one_line_and_writes_nothing(tmp_path, monkeypatch, two_samples, capsys):
    from medseg.demo import main, run_demo

    monkeypatch.setenv("MEDSEG_MODELS", str(tmp_path / "no-packs"))
    said: list[str] = []
    samples = [replace(s, pack="not-installed") for s in two_samples]

    assert run_demo(tmp_path / "out", samples=samples, say=said.append) == []

    assert len(said) == 1 and "not-installed" in said[0] and "nothing was written" in said[0]
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "out2"), "--pack", "not-installed"]) == 0
    assert "nothing was written" in capsys.readouterr().out
    assert not (tmp_path / "out2").exists()


def test_demo_reports_a_failing_sample_and_keeps_the_others(tmp_path, saved_pack, two_samples):
    from medseg.demo import run_demo
    from medseg.errors import MedsegError

    flat = tmp_path / "flat.png"
    import imageio.v3 as iio

    iio.imwrite(flat, np.zeros((32, 32), np.uint8))
    samples = [replace(two_samples[0], pack="test-unet"), replace(two_samples[0], key="flat", path=flat, pack="test-unet")]
    said: list[str] = []

    with pytest.raises(MedsegError, match="1 of 2 samples failed"):
        run_demo(tmp_path / "out", samples=samples, device="cpu", say=said.append)

    assert any("flat.png: error:" in line and "constant" in line for line in said)
    assert (tmp_path / "out" / f"{two_samples[0].stem}_overlay.png").is_file()
