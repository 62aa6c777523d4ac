"""Whole slides in a real napari viewer: the slide/GeoJSON/result readers and the GeoJSON writer
through the plugin, and the Whole slide dock widget (run on tissue, field of view and rectangle,
partial results, cancel and resume, object table with click-to-centre, exports). Needs a display
(Xvfb): `make test` provides one."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import data_dir
from tests.slide_fixtures import TILE_MPP, unet_rgb_pack, write_mosaic_slide

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                       reason="needs a display: run under Xvfb, e.g. xvfb-run -a pytest tests/gui"),
]
PLUGIN = "napari-medseg"
PACK = "test-unet-rgb"


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    from medseg.train.packs import save_pack

    root = tmp_path_factory.mktemp("wsi-gui")
    slide, img, ref = write_mosaic_slide(root, rows=1, cols=2, tile=128, gap=96)  # 544 x 320 px: two 512-px output chunk columns
    pack = unet_rgb_pack(tile=64, balance_on=img[96:224, 96:224])
    save_pack(pack, root / "packs" / PACK)
    return root, slide, ref


@pytest.fixture
def viewer_and_widget(material, make_napari_viewer, monkeypatch, tmp_path):
    root, slide, _ = material
    monkeypatch.setenv("MEDSEG_MODELS", str(root / "packs"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Whole slide")
    widget.device.value = "cpu"
    widget.reset_choices()
    widget.model.value = PACK
    return viewer, widget


def run_and_wait(qtbot, widget, timeout=120_000):
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


# --------------------------------------------------------------------------- readers and writer
def test_slide_opens_as_lazy_multiscale_layer_with_um_scale(material, make_napari_viewer):
    _, slide, _ = material
    viewer = make_napari_viewer()
    [layer] = viewer.open(slide, plugin=PLUGIN)
    assert layer.multiscale and layer.rgb and len(layer.data) == 3
    assert [tuple(d.shape[:2]) for d in layer.data] == [(320, 544), (160, 272), (80, 136)]
    assert type(layer.data[0]).__module__.startswith("dask")
    np.testing.assert_allclose(layer.scale, (TILE_MPP, TILE_MPP))
    assert layer.metadata["medseg"]["mpp"] == pytest.approx(TILE_MPP)


def test_real_svs_opens_with_its_pixel_size_and_associated_images(make_napari_viewer):
    from napari_medseg._slide_io import associated_layer

    path = data_dir("wsi") / "CMU-1-Small-Region.svs"
    viewer = make_napari_viewer()
    [layer] = viewer.open(path, plugin=PLUGIN)
    assert layer.data.shape == (2967, 2220, 3) and not layer.multiscale
    np.testing.assert_allclose(layer.scale, (0.499, 0.499))
    assert layer.metadata["medseg"]["associated_images"] == ["label", "macro", "thumbnail"]
    label, kwargs, kind = associated_layer(path, "label")
    assert label.shape == (463, 387, 3) and kind == "image"


def test_plain_tiff_still_opens_with_the_2d_reader(tmp_path, make_napari_viewer):
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((40, 50, 3), np.uint8))
    viewer = make_napari_viewer()
    [layer] = viewer.open(tmp_path / "plain.tif", plugin=PLUGIN)
    assert not layer.multiscale and layer.data.shape == (40, 50, 3)


def test_geojson_round_trips_through_reader_and_writer(tmp_path, make_napari_viewer):
    import napari

    from medseg.io.geojson import GeoFeature, read_geojson, write_features
    from medseg.measure.objects import mask_polygons

    mask = np.zeros((40, 40), bool)
    mask[2:30, 4:36] = True
    mask[10:20, 10:20] = False
    holed = mask_polygons(mask)
    square = [[[(50.0, 50.0), (60.0, 50.0), (60.0, 60.0), (50.0, 60.0), (50.0, 50.0)]]]
    original = [GeoFeature(holed, "annotation", "Tissue", (10, 200, 30), "t", {"Area µm^2": 12.5}, id="a"),
                GeoFeature(square + square, "detection", "Glomerulus", (0, 255, 0), None, {"Confidence": 0.9}, id="b")]
    src = write_features(original, tmp_path / "in.geojson", mpp=0.5)
    viewer = make_napari_viewer()
    [layer] = viewer.open(src, plugin=PLUGIN)
    assert len(layer.data) == 4 and list(layer.features["ring"]) == ["outer", "hole", "outer", "outer"]
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    out = tmp_path / "out.geojson"
    napari.save_layers(str(out), [layer], plugin=PLUGIN)
    back, info = read_geojson(out)
    assert info["mpp"] == 0.5
    assert [(f.polygons, f.object_type, f.class_name, f.color, f.name, f.measurements, f.id) for f in back] == \
           [(f.polygons, f.object_type, f.class_name, f.color, f.name, f.measurements, f.id) for f in original]


# --------------------------------------------------------------------------- the widget
def test_run_on_tissue_shows_partial_then_multiscale_labels_and_objects(viewer_and_widget, material, qtbot, tmp_path):
    import zarr
    from napari.layers import Labels

    viewer, widget = viewer_and_widget
    _, slide, _ = material
    layer = widget.open_slide(slide)
    assert widget.slide.value.name == layer.name  # napari hands plugins proxies of its layers
    assert tuple(widget.level.choices) == (None, 0, 1, 2), widget.level.choices
    widget.scope.value = "tissue"
    widget.output.value = tmp_path / "run.zarr"
    run_and_wait(qtbot, widget)
    assert widget.result is not None and widget.result.complete, widget.last_message
    result_layer = widget.result_layer
    assert isinstance(result_layer, Labels) and result_layer.multiscale and len(result_layer.data) == widget.result.info["pyramid_levels"]
    assert widget.partial_updates > 0  # labels were shown while chunks were still being written
    labels = zarr.open_group(str(tmp_path / "run.zarr"), mode="r")["labels/0"][...]
    np.testing.assert_allclose(result_layer.scale, (TILE_MPP, TILE_MPP))
    assert widget.result.tiles == widget.result.tiles_tissue < widget.result.tiles_grid
    from medseg.measure.objects import slide_objects

    assert widget.table.native.rowCount() == len(widget.objects) == len(slide_objects(widget.result)) > 0
    assert [widget.table.native.horizontalHeaderItem(i).text() for i in range(3)] == ["id", "class", "x"]
    obj = max(widget.objects, key=lambda o: o.area_px)
    widget.table.native.cellClicked.emit(widget.objects.index(obj), 0)
    np.testing.assert_allclose(viewer.camera.center[-2:], ((obj.centroid_y - 0.5) * TILE_MPP, (obj.centroid_x - 0.5) * TILE_MPP), atol=1e-6)
    csv_path = widget.export_csv(tmp_path / "o.csv")
    geo_path = widget.export_geojson(tmp_path / "o.geojson")
    assert len(csv_path.read_text().splitlines()) == len(widget.objects) + 1
    assert len(json.loads(geo_path.read_text(encoding="utf-8"))["features"]) == len(widget.objects)
    assert labels.shape == (320, 544)


def test_field_of_view_and_rectangle_runs_cover_only_their_region(viewer_and_widget, material, qtbot, tmp_path):
    import zarr

    viewer, widget = viewer_and_widget
    _, slide, _ = material
    layer = widget.open_slide(slide)
    viewer.camera.center = (160 * TILE_MPP, 160 * TILE_MPP)  # on the first tissue tile
    viewer.camera.zoom = max(viewer.canvas.size) / (60 * TILE_MPP)  # about 60 px of the slide on screen
    widget.scope.value = "field of view"
    widget.output.value = tmp_path / "fov.zarr"
    run_and_wait(qtbot, widget)
    done = zarr.open_group(str(tmp_path / "fov.zarr"), mode="r")["done"][...]
    assert done[:, 0].all() and not done[:, 1].any(), widget.last_message

    shapes = viewer.add_shapes([np.array([[100, 515], [100, 540], [180, 540], [180, 515]]) * TILE_MPP], shape_type="rectangle")
    assert shapes is not None
    widget.scope.value = "rectangle"
    widget.output.value = tmp_path / "rect.zarr"
    run_and_wait(qtbot, widget)
    done = zarr.open_group(str(tmp_path / "rect.zarr"), mode="r")["done"][...]
    assert 0 < done.sum() < done.size, widget.last_message
    assert done[:, 0].sum() == 0 and done[:, 1].all()  # only the chunk column under the rectangle
    assert layer in viewer.layers


def test_cancel_keeps_finished_chunks_and_a_rerun_resumes(viewer_and_widget, material, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer, widget = viewer_and_widget
    _, slide, _ = material
    widget.open_slide(slide)
    widget.scope.value = "whole slide"
    widget.batch_size.value = 1
    widget.output.value = tmp_path / "c.zarr"
    before = len(notification_manager.records)
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.progress.value >= 3, timeout=60_000)
    widget.cancel_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert "run the same command again to resume" in widget.last_message
    assert any("resume" in str(n.message) for n in notification_manager.records[before:])
    run_and_wait(qtbot, widget)
    assert widget.result.complete and widget.result.info["resumed"]


def test_no_slide_or_no_rectangle_is_a_notification(viewer_and_widget, material, qtbot):
    viewer, widget = viewer_and_widget
    assert widget.run() is None and "open one" in widget.last_message
    widget.open_slide(material[1])
    widget.scope.value = "rectangle"
    assert widget.run() is None and "draw one" in widget.last_message
