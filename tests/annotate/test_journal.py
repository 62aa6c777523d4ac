"""The journal: reopening replays to the identical working copy, statuses and undo history; a torn last
record is ignored; a process killed in the middle of a burst of edits loses at most the edit in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from medseg.annotate.journal import MAGIC, encode, read
from medseg.annotate.session import JOURNAL_FILE, CorrectionSession
from tests.annotate._shapes import scene

REPO = Path(__file__).resolve().parents[2]


def _script(s: CorrectionSession) -> None:
    s.goto(3)
    s.accept(4)
    s.reject(3)
    s.split_watershed(1)
    s.fill_holes(2)
    s.undo()
    s.merge(2, 4)
    s.paint(100, 120, np.full((10, 12), 9, np.uint32))
    s.undo()
    s.redo()
    s.redraw(3, [(5, 110), (5, 150), (30, 150), (30, 110)])
    s.split_line(3, [(0, 130), (35, 130)])
    s.undo()


def _snapshot(s: CorrectionSession):
    return (
        s.labels.copy(),
        {i: o.to_dict() for i, o in s.objects.items()},
        [(st.op, st.diff.box if st.diff else None) for st in s.history.undo],
        [(st.op, st.diff.box if st.diff else None) for st in s.history.redo],
        {i: (e.edits, round(e.seconds, 6)) for i, e in s.effort.items()},
        s.next_id,
    )


def test_reopen_replays_identical_session(tmp_path):
    s = CorrectionSession.create(tmp_path / "s", scene(), {1: 0.5, 2: 0.6, 3: 0.2, 4: 0.9})
    _script(s)
    live = _snapshot(s)
    s.close()
    again = CorrectionSession.open(tmp_path / "s")
    replayed = _snapshot(again)
    assert np.array_equal(live[0], replayed[0])
    assert live[1:] == replayed[1:]
    # the undo history works after reopening: undo everything back to the model's mask
    while again.undo() is not None:
        pass
    assert np.array_equal(again.labels, scene())
    again.close()


def test_torn_last_record_is_ignored_and_cut_before_appending(tmp_path):
    s = CorrectionSession.create(tmp_path / "s", scene())
    s.reject(3)
    s.fill_holes(2)
    expected = s.labels.copy()
    s.merge(1, 4)
    s.close()
    path = tmp_path / "s" / JOURNAL_FILE
    records, end = read(path)
    data = path.read_bytes()
    last_start = len(data) - len(encode(records[-1].event, records[-1].diff))
    # the last record is the "merge": cut it in half (a crash while writing)
    assert records[-1].event["op"] == "merge"
    path.write_bytes(data[: last_start + (len(data) - last_start) // 2])
    s2 = CorrectionSession.open(tmp_path / "s")
    assert np.array_equal(s2.labels, expected) and s2.objects[4].status == "unreviewed"
    s2.accept(4)  # appended after the last intact record
    s2.close()
    s3 = CorrectionSession.open(tmp_path / "s")
    assert s3.objects[4].status == "accepted" and np.array_equal(s3.labels, expected)
    s3.close()


def test_not_a_journal_is_refused(tmp_path):
    s = CorrectionSession.create(tmp_path / "s", scene())
    s.close()
    (tmp_path / "s" / JOURNAL_FILE).write_bytes(b"something else entirely")
    with pytest.raises(Exception, match="not a medseg correction journal"):
        CorrectionSession.open(tmp_path / "s")
    assert MAGIC not in b"something else entirely"


BURST = textwrap.dedent(
    """
    import sys
    import numpy as np
    from medseg.annotate.session import CorrectionSession

    s = CorrectionSession.open(sys.argv[1])
    k = 0
    while True:
        k += 1
        y, x = (k * 37) % 900, (k * 53) % 900
        s.paint(y, x, np.full((60, 60), k % 50 + 1, np.uint32))
        print(k, flush=True)
    """
)


def _expected_after(n: int, shape) -> np.ndarray:
    m = np.zeros(shape, np.uint32)
    for k in range(1, n + 1):
        y, x = (k * 37) % 900, (k * 53) % 900
        m[y : y + 60, x : x + 60] = k % 50 + 1
    return m


def test_sigkill_mid_burst_loses_at_most_the_edit_in_flight(tmp_path):
    shape = (1000, 1000)
    CorrectionSession.create(tmp_path / "s", np.zeros(shape, np.uint32)).close()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", BURST, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True, env=env)
    acknowledged = 0
    deadline = time.monotonic() + 120
    try:
        while acknowledged < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # lines printed between the last read and the kill: every edit the process acknowledged
    for line in proc.stdout.read().split():
        acknowledged = int(line)
    proc.stdout.close()
    assert acknowledged >= 40, "the editing process did not get going"
    s = CorrectionSession.open(tmp_path / "s")
    edits = len(s.history.undo)
    # every acknowledged edit is there; the one in flight may be there (journalled, not yet acknowledged) or not
    assert edits in (acknowledged, acknowledged + 1)
    assert np.array_equal(s.labels, _expected_after(edits, shape))
    s.close()
