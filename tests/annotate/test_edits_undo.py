"""Every edit changes only its region, and undo/redo give back the exact previous/next arrays and statuses."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.annotate.session import CorrectionSession, History, Step
from medseg.annotate.edits import Diff
from medseg.errors import UsageError
from tests.annotate._shapes import scene


@pytest.fixture
def session(tmp_path):
    s = CorrectionSession.create(tmp_path / "s", scene(), {1: 0.55, 2: 0.8, 3: 0.3, 4: 0.95})
    yield s
    s.close()


def _state(s):
    return s.labels.copy(), {i: o.to_dict() for i, o in s.objects.items()}


EDITS = {
    "accept": lambda s: s.accept(4),
    "reject": lambda s: s.reject(3),
    "merge": lambda s: s.merge(2, 4),
    "split_line": lambda s: s.split_line(1, [(5, 49), (70, 49)]),
    "split_watershed": lambda s: s.split_watershed(1),
    "fill_holes": lambda s: s.fill_holes(2),
    "redraw": lambda s: s.redraw(3, [(5, 110), (5, 150), (30, 150), (30, 110)]),
    "paint": lambda s: s.paint(100, 120, np.full((10, 12), 9, np.uint32)),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edit_undo_redo_exact(session, name):
    before_labels, before_objects = _state(session)
    step = EDITS[name](session)
    assert step is not None
    after_labels, after_objects = _state(session)
    if name != "accept":
        assert not np.array_equal(before_labels, after_labels)
        # the diff holds the changed region only, not the mask
        assert step.diff.old.size < session.labels.size
        assert np.array_equal(before_labels[step.diff.slices], step.diff.old)
    assert session.undo() is step
    assert np.array_equal(session.labels, before_labels)
    assert {i: o.to_dict() for i, o in session.objects.items()} == before_objects
    assert session.redo() is step
    assert np.array_equal(session.labels, after_labels)
    assert {i: o.to_dict() for i, o in session.objects.items()} == after_objects


def test_statuses_of_each_edit(session):
    session.accept(4)
    session.reject(3)
    session.fill_holes(2)
    step = session.split_watershed(1)
    new = [i for i in step.after if i != 1]
    assert len(new) == 1 and session.objects[new[0]].status == "added" and session.objects[new[0]].origin == "split of 1"
    left, right = session.labels[35, 35], session.labels[35, 63]
    assert {int(left), int(right)} == {1, new[0]}
    assert session.objects[1].status == "edited" and session.objects[2].status == "edited"
    assert session.objects[3].status == "rejected" and session.objects[3].area == 0 and not (session.labels == 3).any()
    assert session.objects[4].status == "accepted"
    session.merge(4, 2)
    assert session.objects[2].merged_into == 4 and session.objects[4].status == "edited"
    c = session.counts()
    assert (c["accepted"], c["edited"], c["rejected"], c["added"], c["unreviewed"]) == (0, 3, 1, 1, 0)
    assert c["total"] == 5 and c["reviewed"] == 5
    # areas and boxes follow the pixels
    for oid, obj in session.objects.items():
        ys, xs = np.nonzero(session.labels == oid)
        assert obj.area == ys.size
        if ys.size:
            assert obj.box == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)


def test_many_levels_and_redo_cleared_by_new_edit(session):
    states = [_state(session)[0]]
    for k in range(12):
        session.paint(100 + (k % 3), 5 * k, np.full((8, 4), 20 + k, np.uint32))
        states.append(session.labels.copy())
    for k in range(12, 0, -1):
        session.undo()
        assert np.array_equal(session.labels, states[k - 1])
    assert session.undo() is None
    for k in range(1, 7):
        session.redo()
        assert np.array_equal(session.labels, states[k])
    session.reject(3)
    assert not session.can_redo


def test_history_memory_is_bounded():
    h = History(max_bytes=10_000)
    patch = np.zeros((20, 20), np.uint32)  # 1600 bytes old + 1600 new
    for k in range(20):
        h.push(Step("paint", {}, Diff(0, 0, patch, patch + k), {}, {}))
    assert h.nbytes <= 10_000 and len(h.undo) < 20 and h.dropped == 20 - len(h.undo)
    assert h.undo[-1].diff.new[0, 0] == 19  # the newest steps are kept


def test_line_that_misses_is_refused(session):
    before = session.labels.copy()
    with pytest.raises(Exception, match="does not cut"):
        session.split_line(1, [(5, 5), (8, 8)])
    assert np.array_equal(session.labels, before) and not session.can_undo


def test_unknown_object_and_self_merge(session):
    with pytest.raises(UsageError, match="no object 77"):
        session.reject(77)
    with pytest.raises(UsageError, match="itself"):
        session.merge(1, 1)
    with pytest.raises(UsageError, match="No object is selected"):
        session.accept()


def test_an_added_object_taken_away_again_leaves_no_trace(session):
    step = session.split_watershed(1)
    part = next(i for i in step.after if i != 1)
    assert session.counts()["added"] == 1
    session.merge(1, part)  # the split undone by hand
    assert part not in session.objects and session.counts()["added"] == 0
    assert session.objects[1].status == "edited"
    session.undo()
    assert session.objects[part].status == "added"
    drawn = session.paint(100, 120, np.full((5, 5), 30, np.uint32))
    assert drawn.after[30]["status"] == "added"
    session.paint(100, 120, np.zeros((5, 5), np.uint32))  # erased again
    assert 30 not in session.objects and session.counts()["rejected"] == 0


def test_the_original_is_kept_apart(tmp_path):
    mask = scene()
    s = CorrectionSession.create(tmp_path / "s", mask)
    s.reject(3)
    assert mask.flags.writeable and (mask == 3).any()  # the caller's array is neither frozen nor edited
    assert not s.original.flags.writeable and (s.original == 3).any() and not (s.labels == 3).any()
    s.close()


def test_scripted_annotator_rejects_misses_and_repaints_to_the_reference(tmp_path):
    from medseg.annotate.scripted import correct_to_reference

    s = CorrectionSession.create(tmp_path / "s", scene())
    reference = np.zeros_like(scene())
    reference[scene() == 2] = 1  # object 2 is right
    reference[100:110, 120:140] = 1  # a glomerulus the model missed
    correct_to_reference(s, reference)
    assert np.array_equal(s.labels > 0, reference > 0)
    status = {oid: o.status for oid, o in s.objects.items()}
    assert status[1] == status[3] == status[4] == "rejected" and status[2] != "rejected" and s.counts()["added"] >= 1
    with pytest.raises(ValueError, match="differ in shape"):
        correct_to_reference(s, reference[:10])
