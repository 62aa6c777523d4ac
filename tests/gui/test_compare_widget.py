"""The Compare dock in a real napari viewer: three models on a real ultrasound frame, the grid with linked
views, the table, the plot, the overlaid view, adopting an output and exporting. Needs a display (Xvfb)."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from medseg.io import read_image
from medseg.train.packs import resources_dir
from tests.gui.conftest import TEST_PACK

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                       reason="needs a display: run under Xvfb, e.g. xvfb-run -a pytest tests/gui"),
]


@pytest.fixture
def second_folder(tmp_path):
    """Another untrained 3-class pack in a folder of its own (added through 'Add pack folder')."""
    import torch

    from medseg.train.packs import ClassInfo, save_pack, untrained_pack
    from tests.gui.conftest import CLASS_COLOURS, CLASS_NAMES

    torch.manual_seed(7)
    pack = untrained_pack("unet", 1, 3)
    pack.id = "other-unet"
    pack.tile = 64
    pack.classes = [ClassInfo(i, n, c) for i, (n, c) in enumerate(zip(CLASS_NAMES, CLASS_COLOURS))]
    return save_pack(pack, tmp_path / "run-b" / "pack")


@pytest.fixture
def viewer_and_widget(medseg_models, make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Compare")
    widget.device.value = "cpu"
    return viewer, widget


def frame() -> np.ndarray:
    return read_image(resources_dir() / "samples" / "psfhs_04400.png").array


def run_and_wait(qtbot, widget, timeout=60_000):
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def test_three_models_grid_table_plot_adopt_export(viewer_and_widget, qtbot, second_folder, tmp_path):
    from napari.layers import Labels

    viewer, widget = viewer_and_widget
    image = viewer.add_image(frame(), name="frame")
    widget.reset_choices()
    widget.image.value = image
    assert widget.add_pack_folder(second_folder) == "run-b"
    widget.models.value = ["ultrasound-fhps", TEST_PACK, str(second_folder)]
    run_and_wait(qtbot, widget)
    result = widget.result
    assert result is not None, widget.last_message
    assert sorted(result.names) == sorted(["ultrasound-fhps", TEST_PACK, "run-b"])

    # side by side: one grid view per model plus the disagreement view, each with its own copy of the image
    assert viewer.grid.enabled and viewer.grid.stride == 2
    compare_layers = [layer for layer in viewer.layers if "medseg_compare" in layer.metadata]
    assert len(compare_layers) == 8
    assert viewer.grid.actual_shape(viewer.layers) == (2, 2)
    positions = {viewer.grid.position(viewer.layers.index(layer), viewer.layers) for layer in compare_layers}
    assert len(positions) == 4
    assert not image.visible  # the source is hidden while its copies fill the grid
    for name in result.names:
        labels = widget._layers[name]
        np.testing.assert_array_equal(labels.data, result.output(name).labels)
        backdrop = viewer.layers[viewer.layers.index(labels) - 1]
        assert viewer.grid.position(viewer.layers.index(labels), viewer.layers) == viewer.grid.position(viewer.layers.index(backdrop), viewer.layers)
    np.testing.assert_array_equal(widget._layers["disagreement"].data, 3 - result.agreement)
    shot = viewer.screenshot(canvas_only=True)
    assert shot.ndim == 3 and shot[..., :3].std() > 0

    # the table and the plot
    table = widget.table.value
    assert [row[0] for row in table["data"]] == result.names
    assert "seconds" in table["columns"] and "pairwise Dice" in table["columns"] and "params (M)" in table["columns"]
    assert widget.metric.value == "pairwise Dice"
    bars = widget.figure.axes[0].patches
    assert len(bars) == 3
    expected = [r["pairwise Dice"] for r in result.rows()]
    assert [b.get_height() for b in bars] == pytest.approx(expected)
    widget.metric.value = "seconds"
    assert [b.get_height() for b in widget.figure.axes[0].patches] == pytest.approx([o.seconds for o in result.outputs])

    # overlaid: the chosen model alone over the source image
    widget.view.value = "overlaid"
    assert not viewer.grid.enabled and image.visible
    widget.show.value = TEST_PACK
    assert widget._layers[TEST_PACK].visible and not widget._layers["ultrasound-fhps"].visible
    assert viewer.layers.index(widget._layers[TEST_PACK]) > viewer.layers.index(image)

    # adopt: a new editable Labels layer with that model's mask, independent of it
    widget.adopt_choice.value = "ultrasound-fhps"
    widget.adopt_button.native.click()
    adopted = widget.last_adopted
    assert isinstance(adopted, Labels) and adopted.name == "ultrasound-fhps (adopted)"
    np.testing.assert_array_equal(adopted.data, result.output("ultrasound-fhps").labels)
    adopted.data[:5, :5] = 2  # editing the adopted copy leaves the model's output as it was
    np.testing.assert_array_equal(widget._layers["ultrasound-fhps"].data, result.output("ultrasound-fhps").labels)
    assert viewer.layers.selection.active.name == adopted.name and adopted.editable

    # exports
    csv_path = widget.export_csv(tmp_path / "table.csv")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        assert [r["model"] for r in csv.DictReader(fh)] == result.names
    png = widget.export_png(tmp_path / "figure.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_rectangle_and_reference_scores(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    image = viewer.add_image(frame(), name="frame")
    viewer.add_shapes([[[32, 40], [32, 200], [160, 200], [160, 40]]], shape_type="rectangle", name="box")
    widget.reset_choices()
    widget.image.value = image
    widget.models.value = ["ultrasound-fhps", TEST_PACK]
    widget.region.value = "rectangle"
    run_and_wait(qtbot, widget)
    assert widget.result.outputs[0].labels.shape == (128, 160)
    assert tuple(widget._layers["ultrasound-fhps"].translate[-2:]) == (32, 40)  # drawn where the rectangle is
    assert "mean Dice" not in widget.table.value["columns"]  # no reference: agreement only
    # a reference equal to one model's output on the rectangle: that model scores 1
    truth = np.zeros((256, 256), np.uint8)
    truth[32:160, 40:200] = widget.result.output("ultrasound-fhps").labels
    viewer.add_labels(truth, name="truth")
    widget.reset_choices()
    widget.image.value = image
    widget.reference.value = viewer.layers["truth"]
    run_and_wait(qtbot, widget)
    rows = {r["model"]: r for r in widget.result.rows()}
    assert rows["ultrasound-fhps"]["mean Dice"] == 1.0 and rows["ultrasound-fhps"]["HD95 fetal head"] == 0.0
    assert rows[TEST_PACK]["mean Dice"] < 1.0
    assert widget.metric.value == "mean Dice" and "mean Dice" in widget.table.value["columns"]
    assert len([layer for layer in viewer.layers if "medseg_compare" in layer.metadata]) == 6  # the first run's layers were replaced


def test_refusals_are_sentences(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    assert widget.run() is None and "No image layer" in widget.last_message
    image = viewer.add_image(frame(), name="frame")
    widget.reset_choices()
    widget.image.value = image
    widget.models.value = []
    assert widget.run() is None and "No model chosen" in widget.last_message
    widget.models.value = ["ultrasound-fhps", "colon-polyp"]
    run_and_wait(qtbot, widget)
    assert widget.result is None and "same task" in widget.last_message
    widget.models.value = ["ultrasound-fhps"]
    viewer.add_labels(np.zeros((10, 10), np.uint8), name="small")
    widget.reset_choices()
    widget.reference.value = viewer.layers["small"]
    assert widget.run() is None and "choose the Labels layer drawn on this image" in widget.last_message
    assert widget.add_pack_folder("/nonexistent") is None and "not a pack folder" in widget.last_message
    assert widget.adopt() is None and "run a comparison first" in widget.last_message


def test_stack_current_frame_in_the_field_of_view(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    stack = np.stack([frame(), frame()[:, ::-1], frame()[::-1]])
    image = viewer.add_image(stack, name="loop")
    viewer.dims.set_current_step(0, 2)
    viewer.camera.center = (0, 128, 128)
    viewer.camera.zoom = 2 * viewer.camera.zoom  # about half the frame on screen
    widget.reset_choices()
    widget.image.value = image
    widget.models.value = ["ultrasound-fhps", TEST_PACK]
    widget.region.value = "field of view"
    run_and_wait(qtbot, widget)
    result = widget.result
    assert result is not None, widget.last_message
    out = result.output("ultrasound-fhps").labels
    assert out.shape[0] == 1 and out.shape[1] < 256 and out.shape[2] <= 256  # one frame, part of it
    assert [c["frame"] for c in result.cases["ultrasound-fhps"]] == [2]
    layer = widget._layers["ultrasound-fhps"]
    assert layer.data.shape[0] == 3 and not layer.data[:2].any()  # the compared frame sits at its place in the stack
    np.testing.assert_array_equal(layer.data[2], out[0])
