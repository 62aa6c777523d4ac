"""The Click dock in a real napari viewer: scripted mouse clicks (a positive, a Shift-click negative)
become the current object and, accepted, a committed label that later objects never overwrite.
Needs a display (Xvfb): `make test` provides one."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                       reason="needs a display: run under Xvfb, e.g. xvfb-run -a pytest tests/gui"),
]


@pytest.fixture
def sample():
    """The shipped PSFHS sample frame and the shipped pack's own classes on it (to know where to click)."""
    import imageio.v3 as iio

    from medseg.engine import Predictor
    from medseg.train.packs import load_pack, resources_dir

    image = iio.imread(resources_dir() / "samples" / "psfhs_04400.png")
    labels = Predictor(load_pack("ultrasound-fhps")).predict(image).labels
    return image, labels


def mouse_click(widget, viewer, row, col, modifiers=()):
    """Drive the dock's viewer mouse callback as napari does: press, then release at the same place."""
    event = SimpleNamespace(type="mouse_press", position=(row, col), button=1, modifiers=modifiers)
    gen = widget._on_mouse(viewer, event)
    next(gen)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)


def open_dock(make_napari_viewer, image):
    """A viewer with the frame and the Click dock set to the shipped ultrasound pack on the CPU."""
    viewer = make_napari_viewer()
    viewer.add_image(image, name="frame")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Click")
    widget.reset_choices()
    widget.image.value = viewer.layers["frame"]
    widget.model.value = "ultrasound-fhps"
    widget.device.value = "cpu"
    return viewer, widget


def centre(mask):
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(mask)
    return np.unravel_index(int(np.argmax(dist)), mask.shape)


def test_two_scripted_clicks_become_a_committed_label(make_napari_viewer, qtbot, sample):
    image, labels = sample
    viewer, widget = open_dock(make_napari_viewer, image)
    assert "automatic" in widget.model_info.value
    assert widget.start() and widget._on_mouse in viewer.mouse_drag_callbacks
    # starting builds the session and predicts the frame ahead, off the GUI thread: the first click runs no network
    qtbot.waitUntil(lambda: not widget.running and widget.session is not None, timeout=60_000)
    assert not widget.session.steps and "ready" in widget.jobs.last_message

    head, sym = labels == 2, labels == 1
    mouse_click(widget, viewer, *centre(head))
    qtbot.waitUntil(lambda: not widget.running and widget.session is not None and len(widget.session.steps) == 1, timeout=60_000)
    assert not widget.session.steps[0].ran_network
    mouse_click(widget, viewer, *centre(sym), modifiers=("Shift",))  # negative, outside the head: removes nothing
    qtbot.waitUntil(lambda: not widget.running and len(widget.session.steps) == 2, timeout=60_000)
    clicks = viewer.layers["clicks"]
    assert len(clicks.data) == 2 and [c.positive for c in widget.session.clicks] == [True, False]
    current = viewer.layers["current object"].data.astype(bool)
    assert (current & head).sum() > 0.9 * head.sum() and not (current & sym).any()

    assert widget.accept() == 1
    objects = viewer.layers["frame objects"].data
    assert np.array_equal(objects == 1, current) and len(clicks.data) == 0 and not viewer.layers["current object"].data.any()

    # the next object: the symphysis, committed as label 2 without touching label 1
    widget.click(*centre(sym)[::-1])
    qtbot.waitUntil(lambda: not widget.running and len(widget.session.steps) == 1, timeout=60_000)
    assert widget.undo() and not viewer.layers["current object"].data.any() and len(clicks.data) == 0
    widget.click(*centre(sym)[::-1])
    qtbot.waitUntil(lambda: not widget.running and len(widget.session.steps) == 1, timeout=60_000)
    assert widget.accept() == 2
    objects = viewer.layers["frame objects"].data
    assert np.array_equal(objects == 1, current) and ((objects == 2) & sym).sum() > 0.8 * sym.sum()


def test_a_click_off_the_image_is_refused_in_one_sentence(make_napari_viewer, qtbot, sample):
    image, _ = sample
    viewer, widget = open_dock(make_napari_viewer, image)
    widget.click(400, 10)
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert "outside the image" in widget.last_message and len(viewer.layers["clicks"].data) == 0
    assert widget.accept() == 0 and "no object" in widget.last_message


def test_a_drawn_box_segments_inside_it(make_napari_viewer, qtbot, sample):
    image, labels = sample
    viewer, widget = open_dock(make_napari_viewer, image)
    widget.box_mode.value = True
    rows, cols = np.nonzero(labels == 1)
    box = viewer.layers["click box"]
    box.add_rectangles(np.array([[rows.min() - 5, cols.min() - 5], [rows.max() + 5, cols.max() + 5]]))
    qtbot.waitUntil(lambda: not widget.running and widget.session is not None and widget.session.box is not None, timeout=60_000)
    current = viewer.layers["current object"].data.astype(bool)
    assert (current & (labels == 1)).sum() > 0.8 * (labels == 1).sum() and not (current & (labels == 2)).any()


def test_on_a_stack_the_object_goes_to_the_frame_on_screen(make_napari_viewer, qtbot, sample):
    image, labels = sample
    viewer, widget = open_dock(make_napari_viewer, np.stack([np.roll(image, 40, axis=1), image]))
    viewer.dims.set_current_step(0, 1)
    assert widget.start() and widget.frame() == 1
    head = labels == 2
    mouse_click(widget, viewer, *centre(head))
    qtbot.waitUntil(lambda: not widget.running and widget.session is not None and len(widget.session.steps) == 1, timeout=60_000)
    assert widget.accept() == 1
    objects = viewer.layers["frame objects"].data
    assert objects.shape == (2, *image.shape) and not objects[0].any()
    assert ((objects[1] == 1) & head).sum() > 0.9 * head.sum()
    mouse_click(widget, viewer, *centre(head))
    qtbot.waitUntil(lambda: not widget.running and len(widget.session.steps) == 1, timeout=60_000)
    viewer.dims.set_current_step(0, 0)  # another frame: the unaccepted object is dropped, nothing is committed
    assert widget.session is None and len(viewer.layers["clicks"].data) == 0 and not viewer.layers["frame objects"].data[0].any()


def test_on_a_slide_the_region_is_read_at_the_pack_resolution_and_objects_become_outlines(make_napari_viewer, qtbot):
    import imageio.v3 as iio

    from medseg.engine import Predictor
    from medseg.train.packs import load_pack, resources_dir
    from skimage.transform import resize

    tile = iio.imread(resources_dir() / "samples" / "aidpath_10172.jpg")  # 0.5 µm/px
    level0 = np.concatenate([tile, tile], axis=1)  # a small two-level "slide"
    level1 = (resize(level0, (level0.shape[0] // 2, level0.shape[1] // 2), anti_aliasing=True, preserve_range=True)).astype(np.uint8)
    pack = load_pack("kidney-glomeruli")
    labels = Predictor(pack).predict(level1, mpp=1.0).labels  # the pack at its own 1 µm/px
    from scipy import ndimage

    comp, n = ndimage.label(labels == 1)
    assert n > 0
    biggest = comp == 1 + int(np.argmax(np.bincount(comp.ravel())[1:]))
    viewer = make_napari_viewer()
    viewer.add_image([level0, level1], multiscale=True, rgb=True, name="slide", scale=(0.5, 0.5), metadata={"medseg": {"mpp": 0.5}})
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Click")
    widget.reset_choices()
    widget.image.value = viewer.layers["slide"]
    widget.model.value = "kidney-glomeruli"
    widget.device.value = "cpu"
    row, col = centre(biggest)
    widget.click(2 * col, 2 * row)  # level-0 pixels
    qtbot.waitUntil(lambda: not widget.running and widget.session is not None and len(widget.session.steps) == 1, timeout=60_000)
    region = widget._region
    assert region.level == 1 and region.mpp == 1.0
    y0, x0, h, w = region.box
    current = widget.session.mask
    assert current.shape == (h, w)
    inside = biggest[y0 : y0 + h, x0 : x0 + w]
    assert (current & inside).sum() > 0.8 * biggest.sum()
    assert widget.accept() == 1
    shapes = viewer.layers["slide objects"]
    assert len(shapes.data) == 1 and widget._region is None
    outline = shapes.data[0]  # level-0 (row, col) vertices
    assert abs(outline[:, 0].mean() / 2 - row) < 0.25 * h and abs(outline[:, 1].mean() / 2 - col) < 0.25 * w
