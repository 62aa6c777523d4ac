"""Correction sessions: a model's instance mask, the annotator's working copy, region-diff undo/redo,
a crash-safe journal, exports with an effort log, and fine-tuning on the corrections (no Qt).

    from medseg.annotate import CorrectionSession, export, open_session_iter
    from medseg.engine import run_sync

    s = run_sync(open_session_iter("tile.jpg", pack="kidney-glomeruli", mpp=0.5))
    s.step_to(1); s.accept(); s.step_to(1); s.split_watershed(); s.undo()
    export(s, "out/"); s.close()
"""

from medseg.annotate.export import effort_rows, export, summary
from medseg.annotate.session import STATUSES, CorrectionSession, ObjectInfo
from medseg.annotate.sources import open_session_iter

__all__ = ["CorrectionSession", "ObjectInfo", "STATUSES", "effort_rows", "export", "open_session_iter", "summary"]
