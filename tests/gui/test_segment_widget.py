"""The Segment dock widget in a real napari viewer: runs, adds the Labels layer, cancels, reports errors,
and keeps the Qt event loop responsive. Needs a display (Xvfb): `make test` provides one."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from tests.gui.conftest import CLASS_NAMES, TEST_PACK

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                       reason="needs a display: run under Xvfb, e.g. xvfb-run -a pytest tests/gui"),
]

MAX_STALL_MS = 250.0
MAX_FIRST_RUN_STALL_MS = 1000.0  # includes napari creating the new Labels layer's visuals and controls


def smooth_image(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=[0] * (len(shape) - 2) + [4, 4])
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return (noise * 255).astype(np.uint8)


@pytest.fixture
def viewer_and_widget(medseg_models, make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    widget.device.value = "cpu"
    return viewer, widget


def choose(widget, layer, model=TEST_PACK):
    widget.reset_choices()
    widget.image.value = layer
    widget.model.value = model


def run_and_wait(qtbot, widget, timeout=30_000):
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def new_notifications(since: int):
    from napari.utils.notifications import notification_manager

    return notification_manager.records[since:]


def notification_count() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def reference_labels(image, frames=None, tile=64, overlap=0.25, batch_size=4):
    from medseg.engine import PredictConfig, Predictor
    from medseg.train.packs import resolve

    predictor = Predictor(resolve(TEST_PACK), PredictConfig(tile=tile, overlap=overlap, batch_size=batch_size, device="cpu"))
    return predictor.predict(image, frames=frames).labels


# --------------------------------------------------------------------------- runs
def test_run_adds_labels_layer_named_after_the_model(viewer_and_widget, qtbot):
    from napari.layers import Labels

    viewer, widget = viewer_and_widget
    image = smooth_image((96, 128))
    layer = viewer.add_image(image, name="scan", scale=(0.5, 0.5), translate=(3, 4))
    choose(widget, layer)
    assert widget.tile.value == 64  # taken from the pack's manifest
    assert "fetal head" in widget.model_info.value

    run_and_wait(qtbot, widget)

    result = viewer.layers[TEST_PACK]
    assert isinstance(result, Labels)
    assert result.data.shape == image.shape and result.data.dtype == np.uint8
    np.testing.assert_array_equal(result.data, reference_labels(image))
    assert result.metadata["model"] == TEST_PACK
    assert result.metadata["classes"] == dict(enumerate(CLASS_NAMES))
    assert list(result.features["class"]) == CLASS_NAMES
    np.testing.assert_allclose(result.colormap.map(1), [1, 0, 0, 1])
    np.testing.assert_allclose(result.colormap.map(2), [0, 1, 0, 1])
    assert result.colormap.map(0)[3] == 0  # background transparent
    np.testing.assert_allclose(result.scale, layer.scale)
    np.testing.assert_allclose(result.translate, layer.translate)
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert TEST_PACK in widget.status.value
    assert result.metadata["config"]["tta"] is False


def test_flip_averaging_reaches_the_predictor(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    layer = viewer.add_image(smooth_image((64, 64)), name="scan")
    choose(widget, layer)
    widget.tta.value = True
    run_and_wait(qtbot, widget)
    assert viewer.layers[TEST_PACK].metadata["config"]["tta"] is True


def test_stack_current_frame_then_all_frames(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    stack = smooth_image((3, 64, 80), seed=1)
    layer = viewer.add_image(stack, name="cine")
    choose(widget, layer)
    assert widget.frames.enabled

    viewer.dims.set_current_step(0, 1)
    widget.frames.value = "current frame"
    run_and_wait(qtbot, widget)
    result = viewer.layers[TEST_PACK]
    assert result.data.shape == stack.shape
    np.testing.assert_array_equal(result.data[1], reference_labels(stack, frames=[1])[0])
    assert not result.data[0].any() and not result.data[2].any()

    viewer.dims.set_current_step(0, 2)
    run_and_wait(qtbot, widget)
    assert [ly.name for ly in viewer.layers] == ["cine", TEST_PACK]  # the same layer is updated
    np.testing.assert_array_equal(result.data[2], reference_labels(stack, frames=[2])[0])
    np.testing.assert_array_equal(result.data[1], reference_labels(stack, frames=[1])[0])

    widget.frames.value = "all frames"
    run_and_wait(qtbot, widget)
    np.testing.assert_array_equal(viewer.layers[TEST_PACK].data, reference_labels(stack))


def test_cancel_stops_the_run_and_says_so(viewer_and_widget, qtbot):
    from napari.utils.notifications import NotificationSeverity

    viewer, widget = viewer_and_widget
    layer = viewer.add_image(smooth_image((512, 512), seed=2), name="big")
    choose(widget, layer)
    widget.overlap.value = 0.5
    widget.batch_size.value = 1  # 225 tiles: long enough to cancel in the middle
    before = notification_count()

    widget.run_button.native.click()
    assert widget.running and widget.cancel_button.enabled and not widget.run_button.enabled
    qtbot.waitUntil(lambda: widget.progress.value >= 2, timeout=30_000)
    widget.cancel_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)

    assert TEST_PACK not in [ly.name for ly in viewer.layers]
    assert "Cancelled" in widget.last_message
    notes = new_notifications(before)
    assert any("Cancelled" in n.message and n.severity == NotificationSeverity.INFO for n in notes)
    assert not any(n.severity == NotificationSeverity.ERROR for n in notes)
    assert widget.run_button.enabled and not widget.cancel_button.enabled


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing layer", "No image layer to segment"),
        ("4-D layer", "4-D"),
        ("constant image", "is constant"),
        ("channel mismatch", "5-channel image"),
    ],
)
def test_bad_input_is_one_sentence_notification(viewer_and_widget, qtbot, case, expected):
    from napari.utils.notifications import NotificationSeverity

    viewer, widget = viewer_and_widget
    if case == "4-D layer":
        layer = viewer.add_image(smooth_image((2, 3, 32, 32)), name="volume")
    elif case == "constant image":
        layer = viewer.add_image(np.full((64, 64), 7, np.uint8), name="flat")
    elif case == "channel mismatch":
        layer = viewer.add_image(np.moveaxis(smooth_image((5, 64, 64)), 0, -1), name="five channels", rgb=False)
    else:
        layer = None
    if layer is not None:
        choose(widget, layer)
    before = notification_count()

    run_and_wait(qtbot, widget)

    notes = new_notifications(before)
    errors = [n for n in notes if n.severity == NotificationSeverity.ERROR]
    assert len(errors) == 1, [n.message for n in notes]
    message = errors[0].message
    assert expected in message and message == widget.last_message
    assert "\n" not in message and "Traceback" not in message
    assert message.rstrip().endswith(".")  # a sentence that says what to do
    assert not [ly for ly in viewer.layers if ly.name.startswith("test-unet")]
    assert widget.run_button.enabled and not widget.running


def test_unexpected_failure_is_a_notification_not_a_crash(viewer_and_widget, qtbot, monkeypatch):
    from napari.utils.notifications import NotificationSeverity, notification_manager

    from medseg.engine.predictor import Predictor

    monkeypatch.setattr(notification_manager, "catch_error", True)  # as in the app (napari's tests turn it off)

    def broken(self, *args, **kwargs):
        yield from ()
        raise ValueError("simulated bug")

    monkeypatch.setattr(Predictor, "predict_iter", broken)
    viewer, widget = viewer_and_widget
    choose(widget, viewer.add_image(smooth_image((64, 64)), name="img"))
    before = notification_count()

    run_and_wait(qtbot, widget)

    errors = [n for n in new_notifications(before) if n.severity == NotificationSeverity.ERROR]
    assert len(errors) == 1 and "simulated bug" in errors[0].message
    assert "simulated bug" in widget.status.value
    assert widget.run_button.enabled and not widget.running
    assert [ly.name for ly in viewer.layers] == ["img"]


# --------------------------------------------------------------------------- responsiveness
def measure_run(qtbot, widget) -> tuple[float, int]:
    """Longest gap (ms) between ticks of a 10 ms QTimer from just before Run until the run has ended."""
    import gc

    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    # Full collections of the interpreter's ~400k objects (napari, Qt, torch, pytest) take 0.1-0.25 s in
    # whichever thread triggers them; they are not the widget's doing, so objects alive before the run
    # are frozen for the measurement.
    gc.collect()
    gc.freeze()
    timer.start()
    try:
        qtbot.wait(50)
        run_and_wait(qtbot, widget, timeout=60_000)
        qtbot.wait(50)
    finally:
        timer.stop()
        gc.unfreeze()
    return float(np.diff(ticks).max() * 1000.0), len(ticks)


def test_event_loop_stays_responsive_during_a_run(viewer_and_widget, qtbot):
    """A 10 ms QTimer keeps ticking while a 128-tile run goes on (model, progress, result).

    The first run also has napari insert the new Labels layer: creating its vispy visuals and controls
    costs napari itself 0.1-0.45 s on a busy 2-core machine, whatever the plugin does, so that run has a
    looser bound; the second run (same model and image: the layer is updated) must stay under 250 ms.
    """
    viewer, widget = viewer_and_widget
    stack = smooth_image((2, 384, 384), seed=3)
    layer = viewer.add_image(stack, name="stack")
    choose(widget, layer)
    widget.frames.value = "all frames"
    widget.batch_size.value = 2

    first, _ = measure_run(qtbot, widget)
    assert [ly.name for ly in viewer.layers] == ["stack", TEST_PACK]
    longest, n_ticks = measure_run(qtbot, widget)
    assert [ly.name for ly in viewer.layers] == ["stack", TEST_PACK]

    print(f"\nevent loop stall: {longest:.1f} ms during a run ({n_ticks} ticks of 10 ms); "
          f"{first:.1f} ms in the run that created the Labels layer")
    assert longest < MAX_STALL_MS, f"the Qt event loop stalled for {longest:.0f} ms during a run (limit {MAX_STALL_MS:.0f} ms)"
    assert first < MAX_FIRST_RUN_STALL_MS, f"the Qt event loop stalled for {first:.0f} ms in the first run (limit {MAX_FIRST_RUN_STALL_MS:.0f} ms)"
