"""Whole-slide reading: real slides (Aperio SVS, generic pyramidal TIFF, OME-TIFF SubIFD pyramid) and
pyramids written here from real glomerulus tiles — levels, downsamples, µm/px, pixels, associated
images, lazy arrays, and clear errors for files that are not slides."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.io.slides import is_slide, open_slide, write_pyramid
from tests.conftest import data_dir
from tests.slide_fixtures import TILE_MPP, glomeruli_mosaic, write_mosaic_slide

CMU_SHAPE = (2967, 2220)
needs_imagecodecs = pytest.mark.skipif(importlib.util.find_spec("imagecodecs") is None, reason="tifffile decodes JPEG tiles only with imagecodecs (pip install imagecodecs)")


def wsi(name: str):
    path = data_dir("wsi") / name
    if not path.exists():
        pytest.skip(f"real slide {path} is absent")
    return path


# --------------------------------------------------------------------------- real slides
def test_aperio_svs_levels_mpp_and_associated_images():
    with open_slide(wsi("CMU-1-Small-Region.svs")) as s:
        assert s.backend == "openslide" and s.vendor == "aperio"
        assert s.level_count == 1 and s.shape == CMU_SHAPE
        assert s.mpp == pytest.approx(0.499)
        assert s.associated_names == ["label", "macro", "thumbnail"]
        assert s.associated_image("label").shape == (463, 387, 3)
        assert s.associated_image("macro").shape == (431, 1280, 3)
        assert s.associated_image("thumbnail").shape == (768, 574, 3)
        region = s.read_region(0, 1000, 800, 64, 96)
        assert region.shape == (64, 96, 3) and region.dtype == np.uint8
        assert 0 < region.mean() < 250  # tissue, not glass or black
        with pytest.raises(InputError, match="no associated image 'overview'"):
            s.associated_image("overview")


def test_generic_pyramid_tiff_levels_through_openslide():
    with open_slide(wsi("CMU-1-Small-Region.pyramid.tif")) as s:
        assert s.backend == "openslide" and s.vendor == "generic-tiff"
        assert [lv.shape for lv in s.levels] == [CMU_SHAPE, (1483, 1110), (741, 555)]
        assert [lv.downsample for lv in s.levels] == pytest.approx([1.0, 2.0003, 4.0020], abs=1e-3)
        assert s.mpp == pytest.approx(0.499)
        assert [round(s.level_mpp(i), 3) for i in range(3)] == [0.499, 0.998, 1.997]
        assert s.best_level(1.0) == 1 and s.best_level(0.25) == 0 and s.best_level(8.0) == 2
        assert s.associated_names == []


@needs_imagecodecs
def test_ome_tiff_subifd_pyramid_through_tifffile():
    path = wsi("CMU-1-Small-Region.ome.tif")
    with open_slide(path) as s:
        assert s.backend == "tifffile" and s.vendor == "ome-tiff"  # OpenSlide would see one level only
        assert [lv.shape for lv in s.levels] == [CMU_SHAPE, (1483, 1110), (741, 555)]
        assert s.mpp == pytest.approx(0.499)
        assert s.properties["medseg.mpp-source"] == "ome"
        ome = s.read_region(2, 200, 150, 128, 128).astype(int)
    with open_slide(wsi("CMU-1-Small-Region.pyramid.tif")) as p:
        generic = p.read_region(2, 200, 150, 128, 128).astype(int)
    assert np.abs(ome - generic).mean() < 3  # same pixels, JPEG-encoded twice


@needs_imagecodecs
def test_svs_and_ome_level0_hold_the_same_tissue():
    with open_slide(wsi("CMU-1-Small-Region.svs")) as a, open_slide(wsi("CMU-1-Small-Region.ome.tif")) as b:
        ra = a.read_region(0, 1500, 1000, 256, 256).astype(int)
        aligned = np.abs(ra - b.read_region(0, 1500, 1000, 256, 256)).mean()
        shifted = np.abs(ra - b.read_region(0, 1504, 1004, 256, 256)).mean()
    assert aligned < 8 and aligned < 0.5 * shifted  # the SVS is JPEG Q30, the OME-TIFF a q90 re-encoding of it


def test_lazy_level_array_reads_only_what_is_sliced():
    with open_slide(wsi("CMU-1-Small-Region.svs")) as s:
        calls = []
        original = s.read_region
        s.read_region = lambda *a: calls.append(a) or original(*a)  # type: ignore[method-assign]
        arr = s.level_array(0, chunk=256)
        assert arr.shape == (*CMU_SHAPE, 3) and arr.chunksize == (256, 256, 3)
        assert calls == []
        part = arr[300:310, 520:530].compute()
        assert len(calls) == 1  # one chunk read of (12 x 9) chunks
        np.testing.assert_array_equal(part, original(0, 300, 520, 10, 10))


def test_out_of_slide_pixels_are_white_glass():
    with open_slide(wsi("CMU-1-Small-Region.svs")) as s:
        region = s.read_region(0, -8, -8, 16, 16)
    assert (region[:8] == 255).all() and (region[:, :8] == 255).all()


# --------------------------------------------------------------------------- pyramids written here
def test_written_pyramid_levels_mpp_and_exact_pixels(tmp_path):
    path, img, _ = write_mosaic_slide(tmp_path)
    with open_slide(path) as s:
        assert s.backend == "openslide"
        assert [lv.shape for lv in s.levels] == [(800, 1152), (400, 576), (200, 288)]
        assert [lv.downsample for lv in s.levels] == [1.0, 2.0, 4.0]
        assert s.mpp == pytest.approx(TILE_MPP)
        assert s.level_mpp(2) == pytest.approx(4 * TILE_MPP)
        np.testing.assert_array_equal(s.read_level(0), img)
        level1 = img.reshape(400, 2, 576, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        np.testing.assert_array_equal(s.read_region(1, 37, 101, 50, 70), level1[37:87, 101:171])


def test_subifd_pyramid_opens_with_all_levels_through_tifffile(tmp_path):
    path, img, _ = write_mosaic_slide(tmp_path, name="mosaic.ome.tif", subifds=True)
    with open_slide(path) as s:
        assert s.backend == "tifffile"
        assert [lv.shape for lv in s.levels] == [(800, 1152), (400, 576), (200, 288)]
        assert s.mpp == pytest.approx(TILE_MPP)
        np.testing.assert_array_equal(s.read_region(0, 10, 20, 30, 40), img[10:40, 20:60])
        assert s.read_region(2, 190, 280, 20, 20)[15, 15].tolist() == [255, 255, 255]  # past the edge


def test_mpp_override_and_missing_mpp(tmp_path):
    img, _ = glomeruli_mosaic()
    path = write_pyramid(tmp_path / "nompp.tif", img, mpp=None, levels=2)
    with open_slide(path) as s:
        assert s.mpp is None and s.best_level(1.0) == 0
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.level_mpp(1) == pytest.approx(1.0)


def test_is_slide_tells_pyramids_from_plain_images(tmp_path):
    import tifffile
    from imageio import v3 as iio

    img, _ = glomeruli_mosaic()
    pyramid, _, _ = write_mosaic_slide(tmp_path)
    tifffile.imwrite(tmp_path / "plain.tif", img[:64, :64])
    iio.imwrite(tmp_path / "plain.png", img[:64, :64])
    assert is_slide(pyramid)
    assert not is_slide(tmp_path / "plain.tif")
    assert not is_slide(tmp_path / "plain.png")
    assert not is_slide(tmp_path / "missing.svs")


# --------------------------------------------------------------------------- errors
def test_corrupt_or_unsupported_files_are_clear_errors(tmp_path):
    import tifffile

    junk = tmp_path / "scan.svs"
    junk.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(InputError, match="'scan.svs' is not a slide medseg can read"):
        open_slide(junk)
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InputError, match="not a tiled or pyramidal TIFF"):
        open_slide(tmp_path / "plain.tif")
    with pytest.raises(InputError, match="does not exist"):
        open_slide(tmp_path / "missing.ndpi")
    path, _, _ = write_mosaic_slide(tmp_path)
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(InputError):
        with open_slide(truncated) as s:
            s.read_level(0)
