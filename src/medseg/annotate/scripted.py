"""A scripted annotator, for tests and benchmarks of fine-tuning: turns a session's predicted objects into
a reference mask the way an annotator would, through the session's own edits (so the journal, statuses
and effort log record it like a real review)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medseg import metrics
from medseg.annotate.session import CorrectionSession


def correct_to_reference(session: CorrectionSession, reference: np.ndarray) -> None:
    """Reject each predicted object that misses every reference pixel, then repaint the whole image so
    that the objects follow the reference outlines: a reference object keeps the id of the model's object
    that covers most of it (edited, or untouched when already exact), new ids for what the model missed."""
    if reference.shape != session.labels.shape:
        raise ValueError(f"reference {reference.shape} and session {session.labels.shape} differ in shape")
    ref_ids = metrics.instances(reference > 0)
    for oid in session.order():
        session.goto(oid)
        y0, x0, y1, x1 = session.objects[oid].box
        if not (reference[y0:y1, x0:x1][session.labels[y0:y1, x0:x1] == oid]).any():
            session.reject()
    out = np.zeros(session.labels.shape, np.uint32)
    used: set[int] = set()
    next_id = session.new_id()
    for k, sl in enumerate(ndimage.find_objects(ref_ids), start=1):
        if sl is None:
            continue
        inside = ref_ids[sl] == k
        ids, counts = np.unique(session.labels[sl][inside], return_counts=True)
        keep = [(c, int(i)) for i, c in zip(ids, counts) if i and int(i) not in used]
        oid = max(keep)[1] if keep else next_id  # the model's object that covers it most keeps its id
        if not keep:
            next_id += 1
        used.add(oid)
        out[sl][inside] = oid
    session.paint(0, 0, out)


__all__ = ["correct_to_reference"]
