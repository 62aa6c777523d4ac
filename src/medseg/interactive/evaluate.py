"""The number-of-clicks protocol (Xu et al. 2016; RITM; SAM): simulated clicks until an IoU is reached.

For one object: click at the interior point of the largest error region (positive in a missed part,
negative in a wrongly included one), recompute, repeat up to ``max_clicks``. NoC@t is the number of
clicks after which the IoU first reaches ``t`` (``max_clicks`` when it never does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from medseg.interactive.clicks import next_click
from medseg.interactive.session import ClickSession
from medseg.metrics import iou

MAX_CLICKS = 20


@dataclass
class ObjectRun:
    """IoU after each simulated click on one object, and the wall-clock and CPU seconds of each click."""

    name: str
    ious: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    def iou_after(self, k: int) -> float:
        """IoU after ``k`` clicks (the last IoU reached when the run stopped earlier)."""
        if not self.ious:
            return 0.0
        return self.ious[min(k, len(self.ious)) - 1]

    def noc(self, threshold: float, max_clicks: int = MAX_CLICKS) -> int:
        return next((k + 1 for k, v in enumerate(self.ious[:max_clicks]) if v >= threshold), max_clicks)


def click_run(session: ClickSession, target: np.ndarray, name: str = "object", max_clicks: int = MAX_CLICKS, stop_at: float = 0.90, min_clicks: int = 5) -> ObjectRun:
    """Simulated clicks on one object until IoU ``stop_at`` is reached (but at least ``min_clicks``)."""
    session.reset()
    target = target.astype(bool)
    run = ObjectRun(name)
    for k in range(max_clicks):
        click = next_click(target, session.mask)
        if click is None:  # exact: later clicks would change nothing
            run.ious.append(1.0)
            run.seconds.append(0.0)
            run.cpu_seconds.append(0.0)
        else:
            step = session.add(click)
            run.ious.append(iou(session.mask, target))
            run.seconds.append(step.seconds)
            run.cpu_seconds.append(step.cpu_seconds)
        if k + 1 >= min_clicks and run.ious[-1] >= stop_at:
            break
    return run


def objects_of(mask: np.ndarray, classes: dict[int, str], min_area: int = 64, largest_only: Iterable[int] = ()) -> list[tuple[str, np.ndarray]]:
    """(class name, object mask) for each 8-connected component of each foreground class.

    Classes in ``largest_only`` (one object per image by nature, e.g. the fetal head) give only their
    largest component; components under ``min_area`` pixels are left out.
    """
    out = []
    largest = set(largest_only)
    for value, name in classes.items():
        if value == 0 or not (mask == value).any():
            continue
        labels, n = ndimage.label(mask == value, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        ids = [int(np.argmax(sizes)) + 1] if value in largest else [i + 1 for i in range(n)]
        out += [(name, labels == i) for i in ids if sizes[i - 1] >= min_area]
    return out


def summarise_runs(runs: Sequence[ObjectRun], max_clicks: int = MAX_CLICKS) -> dict[str, float]:
    """Mean NoC@85/90, IoU after 1/3/5 clicks, median wall-clock and CPU ms per click, over the runs."""
    if not runs:
        return {"objects": 0}
    secs = [s for r in runs for s in r.seconds if s > 0]
    cpu = [s for r in runs for s in r.cpu_seconds if s > 0]
    return {
        "objects": len(runs),
        "noc85": float(np.mean([r.noc(0.85, max_clicks) for r in runs])),
        "noc90": float(np.mean([r.noc(0.90, max_clicks) for r in runs])),
        "iou1": float(np.mean([r.iou_after(1) for r in runs])),
        "iou3": float(np.mean([r.iou_after(3) for r in runs])),
        "iou5": float(np.mean([r.iou_after(5) for r in runs])),
        "failed90": int(sum(r.noc(0.90, max_clicks) >= max_clicks and r.iou_after(max_clicks) < 0.90 for r in runs)),
        "ms_per_click": 1000.0 * float(np.median(secs)) if secs else math.nan,
        "cpu_ms_per_click": 1000.0 * float(np.median(cpu)) if cpu else math.nan,
    }


__all__ = ["MAX_CLICKS", "ObjectRun", "click_run", "objects_of", "summarise_runs"]
