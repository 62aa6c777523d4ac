"""The Ultrasound dock's "Summarise loop" in a real napari viewer: marks the key frames of a small stack and
jumps between them. Needs a display (Xvfb)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                       reason="needs a display: run under Xvfb, e.g. xvfb-run -a pytest tests/gui"),
]


@pytest.fixture
def keyframe_packs(tmp_path, monkeypatch):
    """A tiny untrained MSLAU-Net pack and an untrained 'ultrasound-keyframes' FullTransNet on its features."""
    from medseg import models
    from medseg.measure.keyframes import DEFAULT_SUMMARISER
    from medseg.train.packs import ClassInfo, Pack, save_pack, untrained_pack

    torch.manual_seed(0)
    seg = untrained_pack("mslaunet", 1, 3, tile=64)
    seg.id = "test-mslaunet"
    seg.classes = [ClassInfo(0, "background", "#000000"), ClassInfo(1, "pubic symphysis", "#ff0000"), ClassInfo(2, "fetal head", "#00ff00")]
    save_pack(seg, tmp_path / seg.id)
    summariser = Pack(DEFAULT_SUMMARISER, models.build("fulltransnet", in_channels=240, config="small").eval(), "fulltransnet", "small", 240,
                      [ClassInfo(0, "key frame", "#ffd700")], activation="none", tile=64)
    summariser.manifest = {"kind": "sequence"}
    save_pack(summariser, tmp_path / DEFAULT_SUMMARISER)
    monkeypatch.setenv("MEDSEG_MODELS", str(tmp_path))
    return seg.id


def test_summarise_loop_marks_key_frames_and_jumps_between_them(keyframe_packs, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack = np.random.default_rng(1).integers(0, 255, (14, 48, 40), dtype=np.uint8)
    image = viewer.add_image(stack, name="loop")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Ultrasound")
    widget.reset_choices()
    widget.image.value = image
    widget.model.value = keyframe_packs
    assert "ultrasound-keyframes" not in widget.model.choices  # a sequence pack segments nothing
    assert not widget.next_key_button.enabled
    widget.summarise_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    summary = widget.key_summary
    assert summary is not None, widget.last_message
    keys = summary.key_frames
    assert len(keys) == math.ceil(0.15 * 14) and keys == sorted(keys)
    layer = viewer.layers["loop key frames"]
    assert layer.metadata["key_frames"] == keys
    assert [int(p[0]) for p in layer.data] == keys  # one marker on each key frame
    assert "key frame" in widget.last_message
    viewer.dims.set_point(0, 0)
    start = keys[0] if keys[0] > 0 else keys[1]
    widget.next_key_button.native.click()
    assert viewer.dims.current_step[0] == (keys[0] if keys[0] > 0 else keys[1]) == start
    widget.next_key_button.native.click()
    after = [k for k in keys if k > start]
    assert viewer.dims.current_step[0] == (after[0] if after else keys[0])
    widget.previous_key_button.native.click()
    assert viewer.dims.current_step[0] == start


def test_summarise_loop_refuses_a_single_frame(keyframe_packs, make_napari_viewer):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((32, 32), np.uint8), name="frame")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Ultrasound")
    widget.reset_choices()
    widget.image.value = image
    assert widget.summarise() is None
    assert "needs a loop" in widget.last_message and widget.key_summary is None
