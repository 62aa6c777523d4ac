"""The Correct dock in a real napari viewer: review driven by key presses (next, accept, reject, merge,
split, fill, undo, redo), a napari brush stroke recorded as a diff, the right status counts, a reopened
session, and the exports. Needs a display (Xvfb): `make test` provides one."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medseg.annotate.session import CorrectionSession
from tests.annotate._shapes import scene

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                       reason="needs a display: run under Xvfb, e.g. xvfb-run -a pytest tests/gui"),
]
PLUGIN = "napari-medseg"


@pytest.fixture
def session_folder(tmp_path):
    import imageio.v3 as iio

    image = tmp_path / "tile.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    info = {"image": str(image), "region": None, "mpp": None, "source": {"kind": "mask"}}
    CorrectionSession.create(tmp_path / "tile.correct", scene(), {1: 0.55, 2: 0.8, 3: 0.3, 4: 0.95}, info).close()
    return tmp_path / "tile.correct"


def press(qtbot, viewer, key, modifier=None):
    from qtpy.QtCore import Qt

    qtbot.keyClick(viewer.window._qt_viewer, key, modifier or Qt.KeyboardModifier.NoModifier)


def counts(widget):
    c = widget.session.counts()
    return c["unreviewed"], c["accepted"], c["edited"], c["rejected"], c["added"]


def test_review_with_keys(make_napari_viewer, qtbot, session_folder):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Correct")
    assert widget.open_folder(session_folder) is not None
    assert [layer.name for layer in viewer.layers] == ["tile", "model (original)", "corrected", "cuts"]
    layer = viewer.layers["corrected"]
    assert layer.data is widget.session.labels  # napari's tools edit the working copy itself

    assert widget.objects.choices[0] == 3 and widget.session.current is None  # the list, least sure first
    press(qtbot, viewer, Qt.Key.Key_N)  # least sure first: object 3 (0.3)
    assert widget.session.current == 3 and widget.objects.value == 3
    assert np.allclose(viewer.camera.center[-2:], (16.0, 127.0))
    press(qtbot, viewer, Qt.Key.Key_R)  # reject 3
    press(qtbot, viewer, Qt.Key.Key_N)  # -> 1 (0.55)
    assert widget.session.current == 1
    press(qtbot, viewer, Qt.Key.Key_S)  # split the touching pair by watershed
    assert counts(widget) == (2, 0, 1, 1, 1)
    press(qtbot, viewer, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)  # undo the split
    assert counts(widget) == (3, 0, 0, 1, 0) and not (layer.data == 5).any()
    press(qtbot, viewer, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)  # redo
    assert counts(widget) == (2, 0, 1, 1, 1)
    press(qtbot, viewer, Qt.Key.Key_N)  # -> the split-off part (same confidence, higher id)
    press(qtbot, viewer, Qt.Key.Key_N)  # -> 2 (0.8)
    assert widget.session.current == 2
    press(qtbot, viewer, Qt.Key.Key_H)  # fill its hole
    assert (layer.data[85, 40] == 2)
    widget.objects.value = 4  # choosing in the list goes there too
    assert widget.session.current == 4
    press(qtbot, viewer, Qt.Key.Key_A)  # accept 4
    assert counts(widget) == (0, 1, 2, 1, 1)
    widget.merge_with.value = 2
    press(qtbot, viewer, Qt.Key.Key_G)  # merge 2 into 4
    assert widget.session.objects[2].merged_into == 4 and not (layer.data == 2).any()
    assert "0 unreviewed" in widget.counts.value and "1 rejected" in widget.counts.value

    # a napari brush stroke on the working copy is recorded as an undoable diff
    layer.selected_label = 9
    layer.paint((110, 10), 9)
    assert widget.session.objects[9].status == "added" and widget.session.can_undo
    assert widget.session.objects[9].area == int((layer.data == 9).sum()) > 0
    assert counts(widget) == (0, 0, 3, 1, 2) and "2 added" in widget.counts.value  # 4 took 2 in: edited
    snapshot = widget.session.labels.copy()
    statuses = {i: o.status for i, o in widget.session.objects.items()}
    written = widget.export()
    assert set(written) == {"tif", "geojson", "csv", "summary"} and all(p.exists() for p in written.values())

    # reopening the folder gives the same working copy and statuses
    widget.open_folder(session_folder)
    assert np.array_equal(widget.session.labels, snapshot)
    assert {i: o.status for i, o in widget.session.objects.items()} == statuses
    press(qtbot, viewer, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)  # the brush stroke, undone after reopening
    assert 9 not in widget.session.objects


def test_split_along_a_drawn_line_and_refusals(make_napari_viewer, qtbot, session_folder):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Correct")
    widget.open_folder(session_folder)
    press(qtbot, viewer, Qt.Key.Key_S)  # nothing selected yet: one sentence, no crash
    assert "No object is selected" in widget.jobs.last_message
    press(qtbot, viewer, Qt.Key.Key_N)
    press(qtbot, viewer, Qt.Key.Key_N)  # object 1
    viewer.layers["cuts"].add_lines(np.array([[0.0, 49.0], [70.0, 49.0]]))
    viewer.layers.selection.active = viewer.layers["corrected"]
    press(qtbot, viewer, Qt.Key.Key_S)
    assert widget.session.labels[35, 35] != widget.session.labels[35, 63]
    assert len(viewer.layers["cuts"].data) == 0
    assert counts(widget)[4] == 1


def test_launcher_opens_the_dock_on_a_session(qtbot, session_folder, monkeypatch):
    """What 'medseg correct' runs: napari with the Correct dock on the session, at the least sure object."""
    import napari

    from napari_medseg._widgets.correct import main

    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    assert main([str(session_folder)]) == 0
    viewer = napari.current_viewer()
    try:
        assert "corrected" in viewer.layers and viewer.layers["corrected"].selected_label == 3
    finally:
        viewer.close()
    assert main([str(session_folder.parent / "nothing")]) == 1  # one sentence on stderr, the viewer closed


def test_finetune_button_runs_off_the_gui_thread(make_napari_viewer, qtbot, session_folder, monkeypatch, medseg_models):
    """The button runs the core fine-tuning job through the dock's JobRunner (the job itself is replaced
    by a short one here; tests/annotate/test_finetune.py runs the real one)."""
    import threading
    from pathlib import Path

    import medseg.annotate.finetune as finetune
    from medseg.engine import Progress

    seen = {}

    def fake_job(pack, sessions, steps=None, val_sessions=None, workdir=None, cancel=None, **kw):
        seen.update(pack=pack, sessions=[Path(s) for s in sessions], steps=steps, val_sessions=val_sessions, workdir=workdir, thread=threading.current_thread())
        yield Progress(1, 2, "step 1")
        return finetune.FinetuneResult(Path("new-pack"), "1.1.0", {}, {}, 0.7, 0.5, 1, steps, 1.0)

    monkeypatch.setattr(finetune, "finetune_iter", fake_job)
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Correct")
    widget.open_folder(session_folder)
    widget.reset_choices()
    widget.pack.value = "test-unet"
    widget.steps.value = 7
    widget.held_out.value = " held/a.correct ; held/b.correct;"
    widget.finetune_button.changed.emit(None)
    qtbot.waitUntil(lambda: not widget.jobs.running, timeout=30_000)
    assert seen["pack"] == "test-unet" and seen["sessions"] == [session_folder] and seen["steps"] == 7
    assert seen["val_sessions"] == ["held/a.correct", "held/b.correct"]
    assert seen["workdir"] == session_folder.resolve().parent / "medseg-work"
    assert seen["thread"] is not threading.main_thread()
    assert "1.1.0" in widget.status.value and "0.7000 -> 0.5000" in widget.status.value


def _list_entries(widget):
    combo = widget.objects.native
    return [(combo.itemText(k), combo.itemData(k)) for k in range(combo.count())]


def test_object_list_of_thousands_follows_each_action_in_place(make_napari_viewer, qtbot, tmp_path):
    """3 000 objects: after each action the list shows exactly what a rebuild would, and keeping it up
    to date costs a small fraction of a rebuild (which takes hundreds of ms at this size)."""
    import time

    import imageio.v3 as iio

    labels = np.zeros((600, 1000), np.uint32)
    ids = np.arange(1, 3001)
    for i in ids:
        r, c = divmod(int(i) - 1, 50)
        labels[r * 10 + 1 : r * 10 + 8, c * 20 + 1 : c * 20 + 15] = i
    image = tmp_path / "big.png"
    iio.imwrite(image, np.random.default_rng(1).integers(0, 255, (600, 1000), dtype=np.uint8))
    conf = {int(i): float((i * 37) % 1000) / 1000 for i in ids}
    CorrectionSession.create(tmp_path / "big.correct", labels, conf, {"image": str(image), "region": None, "mpp": None, "source": {"kind": "mask"}}).close()

    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Correct")
    widget.open_folder(tmp_path / "big.correct")
    assert len(_list_entries(widget)) == 3000
    timings = []
    for action in ("next", "accept", "next", "reject", "next", "split", "undo", "redo"):
        t = time.perf_counter()
        widget.act(action)
        timings.append(time.perf_counter() - t)
        assert _list_entries(widget) == [(text, i) for text, i in widget._object_choices()], action
        assert widget.objects.value == widget.session.current
    assert counts(widget)[1:4] == (1, 1, 1)  # accepted, edited (split), rejected
    t = time.perf_counter()
    widget.objects.reset_choices()
    rebuild = time.perf_counter() - t
    assert np.median(timings) < rebuild / 2, (timings, rebuild)
