"""Starting a session from a mask file, from QuPath GeoJSON or from a pack; reopening by image."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from medseg.annotate.export import export
from medseg.annotate.sources import default_folder, instances_with_confidence, open_session_iter, parse_region
from medseg.engine import run_sync
from medseg.errors import UsageError
from tests.annotate._shapes import scene


def _image(tmp_path, shape=(120, 160)):
    rng = np.random.default_rng(0)
    path = tmp_path / "tile.png"
    import imageio.v3 as iio

    iio.imwrite(path, rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
    return path


def test_binary_mask_file_becomes_objects_and_reopens(tmp_path):
    image = _image(tmp_path)
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, (scene() > 0).astype(np.uint8) * 255)
    s = run_sync(open_session_iter(image, mask=mask))
    assert s.folder == default_folder(image) and s.counts()["total"] == 4
    s.reject(s.order()[0])
    s.close()
    again = run_sync(open_session_iter(image))  # the session next to the image is reopened
    assert again.counts()["rejected"] == 1 and again.info["source"]["kind"] == "mask"
    again.close()


def test_geojson_round_trip_with_region(tmp_path):
    image = _image(tmp_path, (200, 260))
    truth = np.zeros((200, 260), np.uint32)
    truth[40:160, 60:220] = scene()
    first = run_sync(open_session_iter(image, tmp_path / "a", mask=_write(tmp_path / "ids.tif", truth)))
    assert first.counts()["total"] == 4
    paths = export(first, formats=["geojson"])
    first.close()
    region = parse_region("60,40,160,120")
    s = run_sync(open_session_iter(image, tmp_path / "b", geojson=paths["geojson"], region=region))
    assert s.shape == (120, 160)
    assert np.array_equal(s.labels > 0, scene() > 0)
    assert s.counts()["total"] == 4
    s.close()


def _write(path, arr):
    tifffile.imwrite(path, arr)
    return path


def test_confidence_is_mean_foreground_probability():
    labels = np.zeros((10, 10), np.uint8)
    labels[1:3, 1:3] = 1
    labels[6:9, 6:9] = 1
    fg = np.zeros((10, 10), np.float32)
    fg[1:3, 1:3] = [[0.6, 0.8], [0.7, 0.9]]
    fg[6:9, 6:9] = 0.55
    inst, conf = instances_with_confidence(labels, fg)
    assert inst.max() == 2 and conf[1] == pytest.approx(0.75) and conf[2] == pytest.approx(0.55)


def test_pack_source_sorts_least_sure_first(tmp_path, saved_pack):
    image = tmp_path / "grey.png"
    import imageio.v3 as iio

    rng = np.random.default_rng(1)
    iio.imwrite(image, rng.integers(0, 255, (96, 96), dtype=np.uint8))
    s = run_sync(open_session_iter(image, pack="test-unet"))
    assert s.info["source"] == {"kind": "pack", "pack": "test-unet"}
    conf = [s.objects[i].confidence for i in s.order()]
    assert conf == sorted(conf) and all(0.0 <= c <= 1.0 for c in conf)
    s.close()


def test_sources_are_exclusive(tmp_path):
    image = _image(tmp_path)
    with pytest.raises(UsageError, match="exactly one"):
        run_sync(open_session_iter(image))
    with pytest.raises(UsageError, match="x,y,width,height"):
        parse_region("1,2,3")
