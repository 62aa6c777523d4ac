"""A correction session: the model's instance mask kept as it was, a working copy the annotator edits,
the objects with their review status, undo/redo as region diffs, and a journal that survives crashes.

Layout of a session folder (by default ``<image stem>.correct/`` next to the image)::

    session.json   what was opened (image, slide region, mask source, µm/px) and the objects' confidences
    original.tif   the model's instance mask (never changed)
    journal.bin    every event since (edits with their diffs, undo, redo, moves between objects), fsynced

Opening the folder again replays the journal onto the original: the working copy, the statuses, the
effort per object and the undo/redo stacks come back exactly as they were when the last complete
record was written. Object ids are the mask's instance ids; ids made by splitting or painting are new
and never reused.

Status of an object: ``unreviewed`` (as the model drew it, not looked at), ``accepted`` (looked at,
kept unchanged), ``edited`` (its pixels changed), ``rejected`` (deleted) or ``added`` (drawn by the
annotator or split off another object). Review order is least sure first: by the model's confidence
(the mean foreground probability of the object, 1 when unknown), then by id.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from medseg.annotate import edits
from medseg.annotate.edits import Box, Diff
from medseg.annotate.journal import JournalWriter, read
from medseg.errors import InputError, UsageError
from medseg.io.atomic import atomic_path, atomic_write_text

STATUSES = ("unreviewed", "accepted", "edited", "rejected", "added")
SESSION_FILE = "session.json"
ORIGINAL_FILE = "original.tif"
JOURNAL_FILE = "journal.bin"
FORMAT = 1
IDLE_CAP_S = 120.0  # at most this long between two events counts as time spent on the current object
DEFAULT_UNDO_BYTES = 256 * 2**20
LABEL_DTYPE = np.uint32


@dataclass
class ObjectInfo:
    """One object of the working copy: where it is, how sure the model was, what the annotator did."""

    id: int
    status: str = "unreviewed"
    confidence: float = 1.0
    area: int = 0
    box: Box | None = None  # y0, x0, y1, x1 in mask pixels; None once the object has no pixels
    origin: str = "model"  # "model", "drawn" or "split of <id>"
    merged_into: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = None if self.box is None else list(self.box)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ObjectInfo":
        d = dict(d)
        d["box"] = None if d.get("box") is None else tuple(int(v) for v in d["box"])
        return cls(**d)


@dataclass
class Effort:
    """What one object cost: edits applied to it (undone ones included) and seconds it was the current one."""

    edits: int = 0
    seconds: float = 0.0


@dataclass
class Step:
    """One undoable edit: the pixel diff (None for status-only edits) and the object records before and after."""

    op: str
    args: dict[str, Any]
    diff: Diff | None
    before: dict[int, dict[str, Any] | None]
    after: dict[int, dict[str, Any] | None]

    @property
    def nbytes(self) -> int:
        return (self.diff.nbytes if self.diff is not None else 0) + 200 * (len(self.before) + 1)


class History:
    """Undo and redo stacks of :class:`Step` s whose diffs together stay under ``max_bytes``: when a new
    step would exceed it, the oldest undo steps are dropped (the newest one is always kept)."""

    def __init__(self, max_bytes: int = DEFAULT_UNDO_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.undo: deque[Step] = deque()
        self.redo: deque[Step] = deque()
        self.nbytes = 0
        self.dropped = 0

    def push(self, step: Step) -> None:
        for s in self.redo:
            self.nbytes -= s.nbytes
        self.redo.clear()
        self.undo.append(step)
        self.nbytes += step.nbytes
        self._trim()

    def pop(self, kind: str) -> Step | None:
        """Move the newest step from the undo stack to the redo stack (``"undo"``) or back (``"redo"``)."""
        source, target = (self.undo, self.redo) if kind == "undo" else (self.redo, self.undo)
        if not source:
            return None
        step = source.pop()
        target.append(step)
        return step

    def _trim(self) -> None:
        while self.nbytes > self.max_bytes and len(self.undo) > 1:
            self.nbytes -= self.undo.popleft().nbytes
            self.dropped += 1


def scan_objects(labels: np.ndarray, confidence: dict[int, float] | None = None) -> dict[int, ObjectInfo]:
    """The objects of an instance mask with their area and bounding box (one pass, then each object's box)."""
    confidence = confidence or {}
    out: dict[int, ObjectInfo] = {}
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        c = confidence.get(i, 1.0)
        area = int(np.count_nonzero(labels[sl] == i))
        out[i] = ObjectInfo(i, "unreviewed", float(c) if c == c else 1.0, area, (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
    return out


def _write_mask(path: Path, labels: np.ndarray) -> None:
    """The original mask as a TIFF: zstd in 1024-px tiles when imagecodecs is there (fast to reopen), else zlib."""
    import tifffile

    try:
        import imagecodecs  # noqa: F401

        options: dict[str, Any] = {"compression": "zstd"}
    except ImportError:
        options = {"compression": "zlib"}
    if min(labels.shape) >= 1024:
        options["tile"] = (1024, 1024)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels, **options)


def as_instances(mask: np.ndarray) -> np.ndarray:
    """An instance mask as the session's label type, refusing what cannot be one."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"The mask has shape {mask.shape}: a correction session takes one 2-D instance mask (one id per object, 0 = background).")
    if not np.issubdtype(mask.dtype, np.integer) and mask.dtype != bool:
        raise InputError(f"The mask holds {mask.dtype} values: give integer instance ids (0 = background).")
    if mask.size and mask.min() < 0:
        raise InputError("The mask holds negative values: give instance ids of 0 (background) and above.")
    return mask.astype(LABEL_DTYPE, copy=False)


class CorrectionSession:
    """An open correction session (see the module docstring); create one with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, folder: Path, info: dict[str, Any], original: np.ndarray, objects: dict[int, ObjectInfo],
                 clock: Callable[[], float] | None = None, max_undo_bytes: int = DEFAULT_UNDO_BYTES) -> None:
        self.folder = Path(folder)
        self.info = info
        self.original = original
        self.original.setflags(write=False)
        self.labels = np.array(original, copy=True)
        self.objects = objects
        self.initial_ids = frozenset(objects)
        self.original_boxes: dict[int, Box] = {i: o.box for i, o in objects.items() if o.box is not None}
        self.effort: dict[int, Effort] = {}
        self.history = History(max_undo_bytes)
        self.clock = clock or time.time
        self.current: int | None = None
        self.next_id = (max(objects) + 1) if objects else 1
        self._last_t: float | None = None
        self._journal: JournalWriter | None = None
        self.journal_bytes = 0
        self.replayed = 0
        self.replay_seconds = 0.0

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, folder: str | os.PathLike, mask: np.ndarray, confidence: dict[int, float] | None = None,
               info: dict[str, Any] | None = None, **kwargs: Any) -> "CorrectionSession":
        """Start a new session in ``folder`` from an instance mask (0 = background) and per-object confidences."""
        folder = Path(folder)
        if (folder / SESSION_FILE).exists():
            raise UsageError(f"'{folder}' already holds a correction session: reopen it, or choose another session folder to start afresh.")
        labels = as_instances(mask)
        if labels is mask:  # the session keeps the original read-only: never freeze the caller's array
            labels = labels.copy()
        objects = scan_objects(labels, confidence)
        meta = {"format": FORMAT, "created": _now(), "shape": list(labels.shape), **(info or {})}
        meta["objects"] = {str(k): [v.confidence, v.area, *v.box] for k, v in objects.items() if v.box is not None}
        folder.mkdir(parents=True, exist_ok=True)
        _write_mask(folder / ORIGINAL_FILE, labels)
        journal = folder / JOURNAL_FILE
        if journal.exists():
            journal.unlink()  # a journal without its session file belongs to nothing
        atomic_write_text(folder / SESSION_FILE, json.dumps(meta, indent=1) + "\n")
        session = cls(folder, meta, labels, objects, **kwargs)
        session._start_journal(0)
        return session

    @classmethod
    def open(cls, folder: str | os.PathLike, **kwargs: Any) -> "CorrectionSession":
        """Reopen a session: the original mask plus every intact journal record, replayed."""
        import tifffile

        folder = Path(folder)
        path = folder / SESSION_FILE
        if not path.is_file():
            raise InputError(f"'{folder}' holds no correction session (no {SESSION_FILE}): start one with 'medseg correct IMAGE --mask/--pack/--geojson'.")
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"'{path}' is damaged ({exc.msg}): the session cannot be reopened; start a new one in another folder.") from exc
        if info.get("format") != FORMAT:
            raise InputError(f"'{folder}' was written by another version of medseg (session format {info.get('format')}): open it with that version.")
        try:
            original = as_instances(tifffile.imread(folder / ORIGINAL_FILE))
        except (OSError, ValueError) as exc:
            raise InputError(f"The original mask of session '{folder}' cannot be read ({exc}): the session is damaged.") from exc
        known = info.get("objects") or {}
        try:  # written at creation: confidence, area, box per object (no scan of the mask needed)
            objects = {int(k): ObjectInfo(int(k), "unreviewed", float(v[0]), int(v[1]), tuple(int(b) for b in v[2:6])) for k, v in known.items()}
        except (TypeError, ValueError, IndexError) as exc:
            raise InputError(f"The object table in '{path}' is damaged ({exc}): the session cannot be reopened; start a new one in another folder.") from exc
        session = cls(folder, info, original, objects, **kwargs)
        t0 = time.perf_counter()
        records, end = read(folder / JOURNAL_FILE)
        for rec in records:
            session._replay(rec.event, rec.diff)
        session.replayed, session.replay_seconds = len(records), time.perf_counter() - t0
        session._start_journal(end)
        return session

    def _start_journal(self, end: int) -> None:
        self._journal = JournalWriter(self.folder / JOURNAL_FILE, valid_end=end or None)
        self.mark("open")

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def __enter__(self) -> "CorrectionSession":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # ------------------------------------------------------------------ review
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]

    @property
    def mpp(self) -> float | None:
        return self.info.get("mpp")

    def order(self) -> list[int]:
        """Object ids in review order: least sure first (confidence, then id)."""
        return sorted(self.objects, key=lambda i: (self.objects[i].confidence, i))

    def counts(self) -> dict[str, int]:
        """Objects per status, plus ``total`` and ``reviewed`` (all but unreviewed)."""
        out = {s: 0 for s in STATUSES}
        for o in self.objects.values():
            out[o.status] += 1
        out["total"] = len(self.objects)
        out["reviewed"] = out["total"] - out["unreviewed"]
        return out

    def goto(self, oid: int) -> ObjectInfo:
        """Make ``oid`` the current object (time from now on counts for it)."""
        obj = self._object(oid)
        self.mark("goto", id=int(oid))
        return obj

    def step_to(self, step: int = 1, unreviewed_only: bool = False) -> int | None:
        """Move to the next (``step=1``) or previous (``-1``) object in review order (wrapping round); the
        new current id, or None when there is none (rejected objects are skipped)."""
        order = [i for i in self.order() if self.objects[i].status != "rejected" and (not unreviewed_only or self.objects[i].status == "unreviewed")]
        if not order:
            return None
        full = self.order()
        if self.current in order:
            k = (order.index(self.current) + step) % len(order)
        elif self.current in full:  # the current object no longer qualifies: go on from its place in the full order
            pos = full.index(self.current)
            after = [i for i in order if full.index(i) > pos] if step > 0 else [i for i in reversed(order) if full.index(i) < pos]
            target = after[0] if after else (order[0] if step > 0 else order[-1])
            k = order.index(target)
        else:
            k = 0 if step > 0 else len(order) - 1
        self.goto(order[k])
        return order[k]

    def mark(self, kind: str, **fields: Any) -> None:
        """Journal an event without pixels (open, goto, export) and count the time it closes."""
        event = {"kind": kind, "t": float(self.clock()), **fields}
        self._apply_mark(event)
        self._write(event)

    def _apply_mark(self, event: dict[str, Any]) -> None:
        self._tick(event)
        if event["kind"] == "goto":
            self.current = int(event["id"])

    def _tick(self, event: dict[str, Any]) -> None:
        t = float(event["t"])
        if event["kind"] != "open" and self._last_t is not None and self.current is not None:
            self.effort.setdefault(self.current, Effort()).seconds += min(max(0.0, t - self._last_t), IDLE_CAP_S)
        self._last_t = t

    # ------------------------------------------------------------------ edits
    def accept(self, oid: int | None = None) -> Step | None:
        """Mark the object as looked at and right (an edited or added object keeps its status)."""
        oid = self.target(oid)
        obj = self._object(oid)
        if obj.status != "unreviewed":
            return None
        after = ObjectInfo.from_dict(obj.to_dict())
        after.status = "accepted"
        return self._commit("accept", {"id": oid}, None, {oid: after})

    def reject(self, oid: int | None = None) -> Step | None:
        """Delete the object (a false detection)."""
        oid = self.target(oid)
        obj = self._live(oid)
        return self._pixels("reject", {"id": oid}, edits.delete(self.labels, oid, obj.box))

    def merge(self, keep: int, other: int) -> Step | None:
        """Give ``other``'s pixels to ``keep`` (one object predicted as two)."""
        if keep == other:
            raise UsageError(f"Merging object {keep} with itself changes nothing: choose two different objects.")
        a, b = self._live(keep), self._live(other)
        return self._pixels("merge", {"keep": keep, "other": other}, edits.merge(self.labels, keep, other, a.box, b.box), merged=(other, keep))

    def split_line(self, oid: int, line_yx: Sequence[Sequence[float]]) -> Step | None:
        """Cut the object along a drawn line (row, col points); the largest part keeps its id."""
        obj = self._live(oid)
        ids = self._fresh_ids(8)
        pts = [[float(p[0]), float(p[1])] for p in line_yx]
        return self._pixels("split_line", {"id": oid, "line": pts}, edits.split_line(self.labels, oid, obj.box, pts, ids), split_of=oid)

    def split_watershed(self, oid: int | None = None, parts: int = 2) -> Step | None:
        """Split touching objects drawn as one at their waist (watershed on the distance transform)."""
        oid = self.target(oid)
        obj = self._live(oid)
        ids = self._fresh_ids(parts - 1)
        return self._pixels("split_watershed", {"id": oid, "parts": parts}, edits.split_watershed(self.labels, oid, obj.box, ids, parts), split_of=oid)

    def fill_holes(self, oid: int | None = None) -> Step | None:
        oid = self.target(oid)
        obj = self._live(oid)
        return self._pixels("fill_holes", {"id": oid}, edits.fill_holes(self.labels, oid, obj.box))

    def redraw(self, oid: int, polygon_yx: Sequence[Sequence[float]]) -> Step | None:
        """Replace the object's outline by a drawn polygon (row, col points)."""
        obj = self._object(oid)
        pts = [[float(p[0]), float(p[1])] for p in polygon_yx]
        return self._pixels("redraw", {"id": oid, "polygon": pts}, edits.redraw(self.labels, oid, obj.box, pts))

    def paint(self, y0: int, x0: int, patch: np.ndarray, op: str = "paint") -> Step | None:
        """Write any region patch (brush, eraser, fill); new ids in it become added objects."""
        return self._pixels(op, {"y0": int(y0), "x0": int(x0)}, edits.repaint(self.labels, int(y0), int(x0), np.asarray(patch)))

    def record_painted(self, diff: Diff, op: str = "paint") -> Step | None:
        """Record a change a viewer already made to :attr:`labels` in place (its new patch must be there)."""
        if not np.array_equal(self.labels[diff.slices], diff.new):
            raise UsageError("The painted region does not match the working copy: record a paint right after it happens.")
        diff = edits.make_diff(diff.y0, diff.x0, diff.old, diff.new)
        if diff is None:
            return None
        return self._pixels(op, {"y0": diff.y0, "x0": diff.x0}, diff, applied=True)

    def new_id(self) -> int:
        """An id no object has had in this session (for drawing a new object)."""
        return self.next_id

    # ------------------------------------------------------------------ undo / redo
    @property
    def can_undo(self) -> bool:
        return bool(self.history.undo)

    @property
    def can_redo(self) -> bool:
        return bool(self.history.redo)

    def undo(self) -> Step | None:
        """Revert the last edit (the exact previous array and statuses); None when there is nothing to undo."""
        return self._history_step("undo")

    def redo(self) -> Step | None:
        """Apply the last undone edit again; None when there is nothing to redo."""
        return self._history_step("redo")

    def _history_step(self, kind: str) -> Step | None:
        if not (self.history.undo if kind == "undo" else self.history.redo):
            return None
        event = {"kind": kind, "t": float(self.clock())}
        step = self._apply_history(event)
        self._write(event)
        return step

    def _apply_history(self, event: dict[str, Any]) -> Step | None:
        """Undo (``kind`` "undo") or redo one step: the diff and the object records of its side."""
        self._tick(event)
        undo = event["kind"] == "undo"
        step = self.history.pop(event["kind"])
        if step is None:
            return None
        if step.diff is not None:
            (step.diff.revert if undo else step.diff.apply)(self.labels)
        self._set_objects(step.before if undo else step.after)
        return step

    # ------------------------------------------------------------------ internals
    def target(self, oid: int | None = None) -> int:
        """``oid``, or the current object when it is None (refused when there is none)."""
        if oid is None:
            if self.current is None:
                raise UsageError("No object is selected: move to one first (next/previous) or pick it in the list.")
            return self.current
        return int(oid)

    def _object(self, oid: int) -> ObjectInfo:
        obj = self.objects.get(int(oid))
        if obj is None:
            raise UsageError(f"There is no object {oid} in this mask: choose one of the listed objects.")
        return obj

    def _live(self, oid: int) -> ObjectInfo:
        obj = self._object(oid)
        if obj.box is None:
            raise UsageError(f"Object {oid} has no pixels left ({obj.status}): undo or choose another object.")
        return obj

    def _fresh_ids(self, n: int) -> list[int]:
        return list(range(self.next_id, self.next_id + max(0, n)))

    def _pixels(self, op: str, args: dict[str, Any], diff: Diff | None, merged: tuple[int, int] | None = None,
                split_of: int | None = None, applied: bool = False) -> Step | None:
        """Apply a pixel diff, work out which objects it changed and how, and commit it as one step."""
        if diff is None:
            return None
        if not applied:
            diff.apply(self.labels)
        ids_old, n_old = np.unique(diff.old, return_counts=True)
        ids_new, n_new = np.unique(diff.new, return_counts=True)
        delta: dict[int, int] = {}
        for i, n in zip(ids_old.tolist(), n_old.tolist()):
            delta[i] = delta.get(i, 0) - n
        for i, n in zip(ids_new.tolist(), n_new.tolist()):
            delta[i] = delta.get(i, 0) + n
        after: dict[int, ObjectInfo | None] = {}
        for i in sorted(set(ids_old.tolist()) | set(ids_new.tolist())):
            if i == 0:
                continue
            prior = self.objects.get(i)
            obj = ObjectInfo.from_dict(prior.to_dict()) if prior is not None else None
            if obj is None:
                parent = self.objects.get(split_of) if split_of is not None else None
                obj = ObjectInfo(i, "added", parent.confidence if parent else 1.0, 0, None, f"split of {split_of}" if parent else "drawn")
            obj.area += delta.get(i, 0)
            region = edits.union_box(obj.box, diff.box)
            obj.box = edits.tight_box(self.labels[region[0] : region[2], region[1] : region[3]] == i, region[:2]) if obj.area > 0 else None
            if obj.area <= 0:
                obj.area, obj.box = 0, None
                if obj.origin != "model":  # an object the annotator made and took away again was never there
                    after[i] = None
                    continue
                if merged is not None and i == merged[0]:
                    obj.status, obj.merged_into = "edited", merged[1]
                else:
                    obj.status = "rejected"
            elif obj.status in ("unreviewed", "accepted", "rejected"):
                obj.status, obj.merged_into = "edited", None
            after[i] = obj
        return self._commit(op, args, diff, after)

    def _commit(self, op: str, args: dict[str, Any], diff: Diff | None, after: dict[int, ObjectInfo | None]) -> Step:
        before = {i: (self.objects[i].to_dict() if i in self.objects else None) for i in after}
        step = Step(op, args, diff, before, {i: (o.to_dict() if o is not None else None) for i, o in after.items()})
        event = {"kind": "edit", "op": op, "args": args, "t": float(self.clock()),
                 "before": {str(k): v for k, v in step.before.items()}, "after": {str(k): v for k, v in step.after.items()}}
        self._apply_step(event, step)
        self._write(event, diff)
        return step

    def _apply_step(self, event: dict[str, Any], step: Step) -> None:
        self._tick(event)
        self._set_objects(step.after)
        for i in step.after:
            self.effort.setdefault(i, Effort()).edits += 1
        self.history.push(step)

    def _set_objects(self, records: dict[int, dict[str, Any] | None]) -> None:
        for i, rec in records.items():
            if rec is None:
                self.objects.pop(i, None)
            else:
                self.objects[i] = ObjectInfo.from_dict(rec)
                self.next_id = max(self.next_id, i + 1)

    def _write(self, event: dict[str, Any], diff: Diff | None = None) -> None:
        if self._journal is not None:
            self.journal_bytes += self._journal.append(event, diff)

    def _replay(self, event: dict[str, Any], diff: Diff | None) -> None:
        kind = event.get("kind")
        if kind == "edit":
            if diff is not None:
                if not np.array_equal(self.labels[diff.slices], diff.old):
                    raise InputError(f"The journal of '{self.folder}' does not fit its original mask: the session files were changed; start a new session.")
                diff.apply(self.labels)
            step = Step(event["op"], event.get("args", {}), diff, _int_keys(event["before"]), _int_keys(event["after"]))
            self._apply_step(event, step)
        elif kind in ("undo", "redo"):
            self._apply_history(event)
        else:
            self._apply_mark(event)

    # ------------------------------------------------------------------ the image behind the mask
    def read_image(self) -> np.ndarray:
        """The image (or slide region) the session corrects, as recorded when it was created."""
        from medseg.annotate.sources import read_source_image

        return read_source_image(self.info)


def _int_keys(d: dict[str, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in d.items()}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_session(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SESSION_FILE).is_file()


__all__ = ["CorrectionSession", "Effort", "History", "IDLE_CAP_S", "ObjectInfo", "STATUSES", "Step", "as_instances", "is_session", "scan_objects"]
