"""The Multi-sequence dock in a real napari viewer: runs with three sequences and with one, reports which
were used, and refuses layers that do not share a grid (or none) with one sentence. Needs a display (Xvfb)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.multiseq.packs import TINY_PACK, save_tiny_pack, synthetic_volume

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                       reason="needs a display: run under Xvfb, e.g. xvfb-run -a pytest tests/gui"),
]

MYOPS_VALUES = {0, 200, 500, 600, 1220, 2221}


@pytest.fixture
def viewer_and_widget(tmp_path, monkeypatch, make_napari_viewer):
    save_tiny_pack(tmp_path / "packs", augmentation={"hflip": True, "vflip": True})
    monkeypatch.setenv("MEDSEG_MODELS", str(tmp_path / "packs"))
    viewer = make_napari_viewer()
    for i, name in enumerate(("C0", "DE", "T2")):  # layers as the NIfTI reader names them: (Z, X, Y), slices first
        viewer.add_image(np.moveaxis(synthetic_volume((40, 36, 2), seed=i), 2, 0), name=f"subject/{name}", scale=(12.0, 0.73, 0.73))
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Multi-sequence")
    widget.device.value = "cpu"
    widget.model.value = TINY_PACK
    return viewer, widget


def run_and_wait(qtbot, widget):
    worker = widget.run()
    if worker is not None:
        qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    return worker


def test_runs_with_three_and_with_one_sequence(qtbot, viewer_and_widget):
    viewer, widget = viewer_and_widget
    assert {s: box.value.name for s, box in widget.sequence_boxes.items()} == {"C0": "subject/C0", "LGE": "subject/DE", "T2": "subject/T2"}
    assert run_and_wait(qtbot, widget) is not None
    layer = widget.last_layer
    assert layer is not None and layer.data.shape == (2, 40, 36) and tuple(layer.scale) == (12.0, 0.73, 0.73)
    assert set(np.unique(layer.data)) <= MYOPS_VALUES
    assert "LV myocardial scar" in list(layer.features["class"])
    assert widget.used.value.startswith("Used C0, LGE, T2 (all three)") and "fusion weights" in widget.used.value
    assert widget.progress.value == widget.progress.max == 2  # done: the bar stays full (2 slices)

    widget.assign(C0=None, T2=None)
    assert run_and_wait(qtbot, widget) is not None
    assert widget.last_result.used == ["LGE"] and widget.last_layer is not layer
    assert widget.used.value.startswith("Used LGE (C0, T2 absent)")
    assert widget.last_result.weights == {"LGE": pytest.approx(1.0)}
    assert len([ly for ly in viewer.layers if ly.metadata.get("model") == TINY_PACK]) == 2

    widget.tta.value = True  # flip averaging: the pack records flips in its training, so 4 mirror images
    assert run_and_wait(qtbot, widget) is not None
    assert widget.last_result.flips == 3 and "averaged over 4 mirror images" in widget.used.value


def test_mismatched_layers_and_no_sequence_are_one_sentence(qtbot, viewer_and_widget):
    viewer, widget = viewer_and_widget
    n_layers = len(viewer.layers)
    odd = viewer.add_image(np.zeros((3, 40, 36), np.int16) + np.arange(36, dtype=np.int16), name="other T2", scale=(12.0, 0.73, 0.73))
    widget.assign(T2=odd)
    run_and_wait(qtbot, widget)
    assert "must share one grid" in widget.last_message and "\n" not in widget.last_message
    assert widget.progress.value == 0  # refused: the bar is empty
    spaced = viewer.add_image(np.moveaxis(synthetic_volume((40, 36, 2), 5), 2, 0), name="spaced", scale=(10.0, 0.73, 0.73))
    widget.assign(T2=spaced)
    run_and_wait(qtbot, widget)
    assert "different voxel spacings" in widget.last_message
    widget.assign(C0=None, LGE=None, T2=None)
    assert widget.run() is None
    assert widget.last_message.startswith("No sequence given")
    assert len(viewer.layers) == n_layers + 2  # no result layer was added
