"""The plugin's reader and sample data, and medseg.io reading of PNG, TIFF stacks and MetaImage files.

These use napari's Qt-free ViewerModel: no display needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import data_dir

PLUGIN = "napari-medseg"
PSFHS_MHA_IDS = ["03744", "04510", "04856", "04950", "05060"]


@pytest.fixture
def viewer_model(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_CONFIG", str(tmp_path / "napari.yaml"))
    import npe2
    from napari.components import ViewerModel

    manager = npe2.PluginManager.instance()
    if PLUGIN not in manager.iter_manifests() and PLUGIN not in {m.name for m in manager.iter_manifests()}:
        manager.discover()  # what napari does when a Qt viewer starts
    return ViewerModel()


def write_png(path: Path, array: np.ndarray) -> Path:
    import imageio.v3 as iio

    iio.imwrite(path, array)
    return path


# --------------------------------------------------------------------------- the reader contribution
def test_reader_declines_what_it_does_not_read(tmp_path):
    from napari_medseg._io import get_reader

    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "table.csv")) is None
    assert get_reader(str(tmp_path / "volume.nii.gz")) is None
    assert get_reader(str(tmp_path)) is None  # a folder
    assert get_reader([str(tmp_path / "a.png"), str(tmp_path / "b.txt")]) is None
    assert get_reader([]) is None
    assert callable(get_reader(str(tmp_path / "scan.PNG")))


def test_reader_opens_grey_and_rgb_png(tmp_path, viewer_model, rng):
    grey = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    rgb = rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)
    write_png(tmp_path / "grey_scan.png", grey)
    write_png(tmp_path / "colour.png", rgb)

    layers = viewer_model.open([str(tmp_path / "grey_scan.png")], plugin=PLUGIN)
    layers += viewer_model.open(str(tmp_path / "colour.png"), plugin=PLUGIN)

    assert [ly.name for ly in layers] == ["grey_scan", "colour"]
    np.testing.assert_array_equal(layers[0].data, grey)
    assert not layers[0].rgb
    np.testing.assert_array_equal(layers[1].data, rgb)
    assert layers[1].rgb
    np.testing.assert_allclose(layers[0].scale, [1, 1])  # no spacing in a PNG


def test_reader_opens_multipage_tiff_stack(tmp_path, viewer_model, rng):
    import tifffile

    stack = rng.integers(0, 4000, (4, 32, 48), dtype=np.uint16)
    with tifffile.TiffWriter(tmp_path / "cine.tif") as tif:  # one page per frame, as scanners write them
        for frame in stack:
            tif.write(frame, metadata=None)
    with tifffile.TiffFile(tmp_path / "cine.tif") as tif:
        assert len(tif.pages) == 4
    tifffile.imwrite(tmp_path / "shaped.tif", stack)  # tifffile's own shaped stack

    layers = viewer_model.open(str(tmp_path / "cine.tif"), plugin=PLUGIN)
    layers += viewer_model.open(str(tmp_path / "shaped.tif"), plugin=PLUGIN)

    for layer, name in zip(layers, ["cine", "shaped"]):
        assert layer.name == name and not layer.rgb
        np.testing.assert_array_equal(layer.data, stack)
        assert layer.ndim == 3 and layer.metadata["medseg"]["is_stack"]


def test_reader_scales_metaimage_by_its_spacing(tmp_path, viewer_model, rng):
    import SimpleITK as sitk

    array = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((0.2, 0.3))  # x (columns), y (rows) in mm
    sitk.WriteImage(img, str(tmp_path / "probe.mha"))

    (layer,) = viewer_model.open(str(tmp_path / "probe.mha"), plugin=PLUGIN)

    np.testing.assert_array_equal(layer.data, array)
    np.testing.assert_allclose(layer.scale, [0.3, 0.2])  # (row, col)
    assert layer.metadata["medseg"]["spacing_mm"] == (0.3, 0.2)


@pytest.mark.parametrize("sample_id", PSFHS_MHA_IDS)
def test_reader_opens_real_psfhs_metaimage(sample_id, viewer_model):
    psfhs = data_dir("psfhs")
    path = psfhs / "mha_samples" / "image_mha" / f"{sample_id}.mha"
    if not path.is_file():
        pytest.skip(f"PSFHS MetaImage sample {path} is absent")
    import imageio.v3 as iio

    (layer,) = viewer_model.open(str(path), plugin=PLUGIN)

    assert layer.name == sample_id and not layer.rgb
    assert layer.data.shape == (256, 256) and layer.data.dtype == np.uint8  # three identical planes -> one
    np.testing.assert_allclose(layer.scale, [1, 1])  # the header's spacing of 1 is a placeholder
    png = psfhs / "images" / f"{sample_id}.png"
    if png.is_file():  # the data README: PNG == first plane of the MetaImage, pixel for pixel
        np.testing.assert_array_equal(layer.data, iio.imread(png))


def test_reader_reports_an_unreadable_file(tmp_path):
    from medseg.errors import InputError
    from napari_medseg._io import get_reader

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    reader = get_reader(str(bad))
    with pytest.raises(InputError, match="broken.png"):
        reader(str(bad))


# --------------------------------------------------------------------------- medseg.io underneath
def test_read_image_png_tiff_stack_and_metaimage(tmp_path, rng):
    import SimpleITK as sitk
    import tifffile

    from medseg.io import read_image

    grey = rng.integers(0, 255, (16, 24), dtype=np.uint8)
    png = read_image(write_png(tmp_path / "a.png", grey))
    assert not png.rgb and not png.is_stack and png.spacing is None
    np.testing.assert_array_equal(png.array, grey)

    rgb_stack = rng.integers(0, 255, (3, 16, 24, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "b.tiff", rgb_stack, photometric="rgb")
    stack = read_image(tmp_path / "b.tiff")
    assert stack.rgb and stack.is_stack and stack.array.shape == (3, 16, 24, 3)

    img = sitk.GetImageFromArray(grey)
    img.SetSpacing((0.5, 0.25))
    sitk.WriteImage(img, str(tmp_path / "c.mha"))
    mha = read_image(tmp_path / "c.mha")
    assert mha.spacing == (0.25, 0.5) and not mha.is_stack
    np.testing.assert_array_equal(mha.array, grey)


# --------------------------------------------------------------------------- sample data
def load_sample_index() -> list[dict]:
    from medseg.demo import samples_dir

    return json.loads((samples_dir() / "samples.json").read_text(encoding="utf-8"))["samples"]


def test_sample_list_matches_the_manifest_and_attribution():
    import yaml

    from medseg.demo import samples_dir

    entries = load_sample_index()
    manifest = yaml.safe_load((Path(__file__).resolve().parents[2] / "napari_medseg" / "napari.yaml").read_text())
    assert {s["key"] for s in manifest["contributions"]["sample_data"]} == {e["key"] for e in entries}
    attribution = (samples_dir() / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for e in entries:
        assert (samples_dir() / e["file"]).is_file()
        assert e["file"] in attribution
        assert e["pack"] in ("ultrasound-fhps", "kidney-glomeruli")
    assert "CC BY 4.0" in attribution and "doi:10.1038/s41597-024-03266-4" in attribution
    shipped = {p.name.lower() for p in samples_dir().iterdir()}
    assert not any(word in name for name in shipped for word in ("kvasir", "cvc", "polyp", "cxr"))


@pytest.mark.parametrize("key", [e["key"] for e in load_sample_index()])
def test_sample_data_contribution_loads(key, viewer_model):
    entry = next(e for e in load_sample_index() if e["key"] == key)

    (layer,) = viewer_model.open_sample(PLUGIN, key)

    assert layer.name == Path(entry["file"]).stem
    assert layer.data.ndim in (2, 3) and layer.data.size > 0 and layer.data.std() > 0
    assert layer.rgb == (layer.data.ndim == 3)
    size = entry["pixel_size"] or 1.0
    np.testing.assert_allclose(layer.scale, [size, size])
    assert layer.metadata["medseg"]["suggested_pack"] == entry["pack"]
