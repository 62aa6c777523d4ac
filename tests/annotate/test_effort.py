"""Effort log and summary of a scripted session, against values worked out by hand."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medseg.annotate.export import export, summary
from medseg.annotate.session import CorrectionSession


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _mask() -> np.ndarray:
    m = np.zeros((40, 40), np.uint32)
    m[0:10, 0:10] = 1  # 100 px, confidence 0.5
    m[20:30, 0:10] = 2  # 100 px, confidence 0.9
    m[0:10, 20:25] = 3  # 50 px, confidence 0.2
    return m


def test_scripted_session_effort_and_summary(tmp_path):
    clock = Clock()
    s = CorrectionSession.create(tmp_path / "s", _mask(), {1: 0.5, 2: 0.9, 3: 0.2}, clock=clock)  # "open" at t=0
    assert s.order() == [3, 1, 2]
    steps = [
        (10, lambda: s.step_to(1)),  # -> 3 (least sure)
        (14, lambda: s.reject()),  # 3: 4 s
        (20, lambda: s.step_to(1)),  # 3: +6 s = 10 s; -> 1
        (30, lambda: s.paint(0, 10, np.full((10, 5), 1, np.uint32))),  # 1 grows to cols 0-14: 10 s
        (33, lambda: s.paint(0, 5, np.zeros((10, 5), np.uint32))),  # 1 loses cols 5-9: +3 s
        (40, lambda: s.step_to(1)),  # 1: +7 s = 20 s; -> 2
        (400, lambda: s.accept()),  # 2: 360 s idle, capped at 120 s
        (410, lambda: s.paint(30, 30, np.full((5, 5), 7, np.uint32))),  # a new object 7; 2: +10 s
    ]
    for t, action in steps:
        clock.now = t
        action()
    assert s.current == 2
    clock.now = 415  # exporting closes 5 more seconds on object 2
    paths = export(s, tmp_path / "out", formats=["tif", "csv", "summary"])
    with open(paths["csv"], newline="") as fh:
        rows = {int(r["id"]): r for r in csv.DictReader(fh)}
    assert list(rows) == [3, 1, 2, 7]
    expect = {
        # id: status, final_id, original px, final px, iou, dice, edits, seconds
        3: ("rejected", "", 50, 0, 0.0, 0.0, 1, 10.0),
        1: ("edited", "1", 100, 100, 1 / 3, 0.5, 2, 20.0),
        2: ("accepted", "2", 100, 100, 1.0, 1.0, 1, 135.0),
        7: ("added", "7", 0, 25, None, None, 1, 0.0),
    }
    for oid, (status, final, orig, fin, iou, dice, n_edits, seconds) in expect.items():
        r = rows[oid]
        assert r["status"] == status and r["final_id"] == final
        assert int(r["original_area_px"]) == orig and int(r["final_area_px"]) == fin
        assert int(r["edits"]) == n_edits and float(r["seconds"]) == pytest.approx(seconds)
        if iou is None:
            assert r["iou"] == "" and r["dice"] == ""
        else:
            assert float(r["iou"]) == pytest.approx(iou, abs=1e-6) and float(r["dice"]) == pytest.approx(dice, abs=1e-6)
    got = json.loads(paths["summary"].read_text())
    assert (got["accepted_unchanged"], got["edited"], got["rejected"], got["added"], got["unreviewed"]) == (1, 1, 1, 1, 0)
    assert got["objects_model"] == 3 and got["objects_final"] == 3
    assert got["mean_dice_original_to_final"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert got["mean_iou_original_to_final"] == pytest.approx((0 + 1 / 3 + 1) / 3)
    # foreground: model 250 px, final 225 px, 150 px shared
    assert got["mask_dice"] == pytest.approx(2 * 150 / (250 + 225))
    assert got["edits"] == 5 and got["seconds"] == pytest.approx(165.0)
    s.close()
    # the journal carries the times: a reopened session gives the same log
    again = CorrectionSession.open(tmp_path / "s")
    assert summary(again)["seconds"] == pytest.approx(165.0) and summary(again)["edits"] == 5
    again.close()
    import tifffile

    assert np.array_equal(tifffile.imread(paths["tif"]), s.labels)
