"""The Ultrasound dock widget in a real napari viewer: measures a Labels layer, draws the measurement
layers, updates them after a Labels edit, segments with a (temporary, untrained) pack, exports the
table. Needs a display (Xvfb): `make test` provides one."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest

from tests.conftest import data_dir
from tests.gui.conftest import TEST_PACK

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                       reason="needs a display: run under Xvfb, e.g. xvfb-run -a pytest tests/gui"),
]

PSFHS_ID = "04510"


def scene(shape=(256, 256), head_centre=(190, 110), radius=50) -> np.ndarray:
    """An elongated ellipse (symphysis, tilted 20 degrees) and a disc (head) below it: measurable by both methods."""
    rows, cols = np.indices(shape)
    labels = np.zeros(shape, np.uint8)
    th = math.radians(20)
    dr, dc = rows - 60, cols - 90
    u = dc * math.cos(th) + dr * math.sin(th)
    v = -dc * math.sin(th) + dr * math.cos(th)
    labels[(u / 36) ** 2 + (v / 9) ** 2 <= 1] = 1
    labels[(rows - head_centre[0]) ** 2 + (cols - head_centre[1]) ** 2 <= radius**2] = 2
    return labels


@pytest.fixture
def viewer_and_widget(medseg_models, make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Ultrasound")
    widget.device.value = "cpu"
    return viewer, widget


def wait_idle(qtbot, widget, timeout=30_000):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def measure_layer(qtbot, widget, layer, frames="current frame"):
    widget.reset_choices()
    widget.labels_choice.value = layer
    widget.frames.value = frames
    widget.measure_button.native.click()
    wait_idle(qtbot, widget)


def test_measures_a_psfhs_frame_with_its_reference_mask_and_draws_the_layers(viewer_and_widget, qtbot, tmp_path):
    import imageio.v3 as iio
    from medseg.measure.biometry import aop_hsd

    root = data_dir("psfhs")
    viewer, widget = viewer_and_widget
    image = iio.imread(root / "images" / f"{PSFHS_ID}.png")
    mask = iio.imread(root / "labels" / f"{PSFHS_ID}.png")
    viewer.add_image(image, name=PSFHS_ID)
    labels = viewer.add_labels(mask, name=f"{PSFHS_ID} reference", opacity=0.4)
    measure_layer(qtbot, widget, labels)
    assert viewer.layers.selection.active is labels  # still ready for painting corrections

    expected = aop_hsd(mask)
    row = widget.rows[0]
    assert row.ok and row.aop_deg == pytest.approx(expected.aop) and row.hsd_px == pytest.approx(expected.hsd)
    shapes, points = widget.shapes_layer, widget.points_layer
    assert shapes in viewer.layers and points in viewer.layers
    assert list(shapes.shape_type) == ["line", "line", "line"]  # symphysis axis, tangent, HSD
    assert any(t.startswith("AoP ") for t in shapes.text.values) and any(t.startswith("HSD ") for t in shapes.text.values)
    assert list(points.features["label"]) == ["V", "E", "T", "H"]
    np.testing.assert_allclose(points.data[0], expected.vertex)
    np.testing.assert_allclose(points.data[2], expected.tangent)
    assert widget.table.shape[0] == 1 and widget.table.data[0][1] == f"{expected.aop:.1f}"
    assert widget.image.value is viewer.layers[PSFHS_ID]

    path = tmp_path / "screens" / "ultrasound_widget.png"
    path.parent.mkdir()
    viewer.window._qt_window.resize(1400, 900)
    qtbot.wait(50)
    viewer.reset_view()
    viewer.screenshot(path=str(path), canvas_only=False)
    assert path.stat().st_size > 10_000
    if os.environ.get("MEDSEG_SCREENSHOT_DIR"):  # keep a copy to look at
        import shutil

        shutil.copy(path, os.environ["MEDSEG_SCREENSHOT_DIR"])


def test_a_labels_edit_remeasures_that_frame_and_redraws(viewer_and_widget, qtbot):
    from medseg.measure.biometry import aop_hsd

    viewer, widget = viewer_and_widget
    stack = np.stack([scene(), scene(head_centre=(200, 120), radius=55)])
    labels = viewer.add_labels(stack.copy(), name="masks")
    measure_layer(qtbot, widget, labels, frames="all frames")
    assert sorted(widget.rows) == [0, 1] and all(r.ok for r in widget.rows.values())
    viewer.dims.set_point(0, 1)
    before = widget.rows[1].aop_deg
    vertex_before = widget.points_layer.data[0].copy()

    # erase the right side of the head on frame 1, as an eraser stroke would (one undoable step)
    edited = stack[1].copy()
    rr, cc = np.nonzero((edited == 2) & (np.indices(edited.shape)[1] > 140))
    labels.data_setitem((np.full(rr.size, 1), rr, cc), 0)
    edited[rr, cc] = 0
    qtbot.waitUntil(lambda: widget.rows[1].aop_deg != before, timeout=5000)
    assert widget.rows[1].aop_deg == pytest.approx(aop_hsd(edited).aop)
    assert widget.rows[0].aop_deg == pytest.approx(aop_hsd(stack[0]).aop)  # the other frame is untouched
    assert any(t == f"AoP {widget.rows[1].aop_deg:.1f}°" for t in widget.shapes_layer.text.values)
    np.testing.assert_allclose(widget.points_layer.data[0], vertex_before)  # the symphysis did not move

    # erase the whole head: a status and a reason, not an exception; the lines that need the head go
    idx = np.nonzero(labels.data[1] == 2)
    labels.data_setitem((np.full(idx[0].size, 1), idx[0], idx[1]), 0)
    qtbot.waitUntil(lambda: widget.rows[1].status == "no_head", timeout=5000)
    assert "no fetal head" in widget.table.data[1][5]
    assert list(widget.shapes_layer.shape_type) == []
    assert "not measurable" in widget.status.value
    labels.undo()  # undo brings the head back, and its measurement
    qtbot.waitUntil(lambda: widget.rows[1].ok, timeout=5000)
    assert widget.rows[1].aop_deg == pytest.approx(aop_hsd(edited).aop)

    # replacing the whole data (e.g. another tool writes the layer) re-measures every measured frame
    labels.data = stack.copy()
    qtbot.waitUntil(lambda: widget.rows[1].aop_deg == pytest.approx(before), timeout=5000)
    assert widget.table.data[1][1] == f"{before:.1f}" and widget.table.data[1][5] == "ok"


def test_frame_slider_shows_that_frames_measurement(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    stack = np.stack([scene(), scene(head_centre=(200, 140))])
    labels = viewer.add_labels(stack, name="masks")
    measure_layer(qtbot, widget, labels, frames="all frames")
    viewer.dims.set_point(0, 0)
    text0 = list(widget.shapes_layer.text.values)
    viewer.dims.set_point(0, 1)
    text1 = list(widget.shapes_layer.text.values)
    assert text0 != text1 and f"AoP {widget.rows[1].aop_deg:.1f}°" in text1
    widget.table.native.cellClicked.emit(0, 0)  # a click on the first row shows frame 0
    assert viewer.dims.point[0] == 0 and list(widget.shapes_layer.text.values) == text0


def test_ellipse_method_draws_the_fitted_ellipses(viewer_and_widget, qtbot):
    from medseg.measure.ellipse import aop_hsd_ellipse

    viewer, widget = viewer_and_widget
    mask = scene()
    labels = viewer.add_labels(mask, name="mask")
    widget.method.value = "ellipse"
    measure_layer(qtbot, widget, labels)
    assert widget.rows[0].aop_deg == pytest.approx(aop_hsd_ellipse(mask).aop)
    assert list(widget.shapes_layer.shape_type).count("polygon") == 2
    widget.method.value = "contour"  # switching the method re-measures at once
    assert widget.rows[0].method == "contour" and widget.shapes_layer.nshapes == 3


def test_segment_and_measure_with_a_pack_adds_labels_and_exports_csv(viewer_and_widget, qtbot, tmp_path):
    from scipy.ndimage import gaussian_filter

    viewer, widget = viewer_and_widget
    rng = np.random.default_rng(0)
    frames = (gaussian_filter(rng.random((3, 64, 80)), sigma=(0, 3, 3)) * 255).astype(np.uint8)
    image = viewer.add_image(frames, name="cine")
    widget.reset_choices()
    widget.image.value = image
    widget.model.value = TEST_PACK
    widget.frames.value = "all frames"
    widget.run_button.native.click()
    wait_idle(qtbot, widget, timeout=60_000)
    layer = widget.labels_choice.value
    assert layer is not None and layer.name == f"{TEST_PACK} (cine)" and layer.data.shape == frames.shape
    assert sorted(widget.rows) == [0, 1, 2]  # an untrained pack: measured or not, every frame has a row
    assert all(r.status for r in widget.rows.values())

    out = widget.export_csv(tmp_path / "table.csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["frame"] for r in rows] == ["0", "1", "2"]
    assert {"stem", "frame", "aop_deg", "hsd_px", "hsd_mm", "status", "reason"} <= set(rows[0])


def test_refusals_are_notifications_not_crashes(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    widget.reset_choices()
    assert widget.measure() is None and "No Labels layer" in widget.last_message
    assert widget.run() is None and "No image layer" in widget.last_message
    assert widget.export_csv() is None and "Nothing to export" in widget.last_message
    empty = viewer.add_labels(np.zeros((32, 32), np.uint8), name="empty")
    measure_layer(qtbot, widget, empty)
    assert widget.rows[0].status == "no_symphysis" and widget.rows[0].plane == "none"
