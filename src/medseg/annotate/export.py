"""What a correction session hands on: the corrected instance mask (TIFF and/or zarr), QuPath GeoJSON,
the effort log (one CSV row per object) and the session summary. Every file is written atomically.

Effort log columns: ``id``, ``status``, ``origin``, ``confidence`` (the model's), ``final_id`` (the
object that holds its pixels now: itself, or the object it was merged into), ``original_area_px``,
``final_area_px``, ``iou`` and ``dice`` of the model's object against its final shape (empty for added
objects, 0 for rejected ones), ``edits`` (edits applied to it, undone ones included) and ``seconds``
(time it was the current object, each pause capped at :data:`~medseg.annotate.session.IDLE_CAP_S`).

Summary: objects ``accepted_unchanged``, ``edited``, ``rejected``, ``added``, ``unreviewed``;
``mean_dice_original_to_final`` over the model's objects (rejected ones count 0) and
``mean_iou_original_to_final``; ``mask_dice`` of the whole foreground, model vs final; edits, undo depth
and seconds in all.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from medseg import metrics
from medseg.annotate.edits import union_box
from medseg.annotate.session import CorrectionSession
from medseg.errors import InputError, UsageError
from medseg.io.atomic import atomic_write_text

EFFORT_COLUMNS = ["id", "status", "origin", "confidence", "final_id", "original_area_px", "final_area_px", "iou", "dice", "edits", "seconds"]
FORMATS = ("tif", "zarr", "geojson", "csv", "summary")


@dataclass
class EffortRow:
    id: int
    status: str
    origin: str
    confidence: float
    final_id: int | None
    original_area_px: int
    final_area_px: int
    iou: float | None
    dice: float | None
    edits: int
    seconds: float

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id, "status": self.status, "origin": self.origin, "confidence": round(self.confidence, 4),
            "final_id": "" if self.final_id is None else self.final_id, "original_area_px": self.original_area_px,
            "final_area_px": self.final_area_px, "iou": "" if self.iou is None else round(self.iou, 6),
            "dice": "" if self.dice is None else round(self.dice, 6), "edits": self.edits, "seconds": round(self.seconds, 3),
        }


def _final_id(session: CorrectionSession, oid: int) -> int | None:
    seen = set()
    while oid not in seen:
        seen.add(oid)
        obj = session.objects.get(oid)
        if obj is None:
            return None
        if obj.merged_into is None:
            return oid if obj.area > 0 else None
        oid = obj.merged_into
    return None


def effort_rows(session: CorrectionSession) -> list[EffortRow]:
    """One row per object of the working copy (the model's and the added ones), in review order."""
    rows = []
    for oid in session.order():
        obj = session.objects[oid]
        final = _final_id(session, oid)
        final_obj = session.objects.get(final) if final is not None else None
        orig_box = session.original_boxes.get(oid)
        orig_area, iou, dice = 0, None, None
        if orig_box is not None:
            y0, x0, y1, x1 = union_box(orig_box, final_obj.box if final_obj is not None else None)
            a = session.original[y0:y1, x0:x1] == oid
            b = session.labels[y0:y1, x0:x1] == final if final is not None else np.zeros_like(a)
            orig_area = int(a.sum())
            iou, dice = metrics.iou(b, a), metrics.dice(b, a)
        effort = session.effort.get(oid)
        rows.append(EffortRow(oid, obj.status, obj.origin, obj.confidence, final, orig_area, final_obj.area if final_obj is not None else 0,
                              iou, dice, effort.edits if effort else 0, effort.seconds if effort else 0.0))
    return rows


def summary(session: CorrectionSession, rows: list[EffortRow] | None = None) -> dict[str, Any]:
    """Counts per outcome and how far the model's objects moved (see the module docstring)."""
    rows = rows if rows is not None else effort_rows(session)
    counts = session.counts()
    model_rows = [r for r in rows if r.id in session.initial_ids]
    dices = [r.dice for r in model_rows if r.dice is not None]
    ious = [r.iou for r in model_rows if r.iou is not None]
    return {
        "objects_model": len(session.initial_ids),
        "objects_final": int(sum(1 for o in session.objects.values() if o.area > 0)),
        "accepted_unchanged": counts["accepted"],
        "edited": counts["edited"],
        "rejected": counts["rejected"],
        "added": counts["added"],
        "unreviewed": counts["unreviewed"],
        "mean_dice_original_to_final": float(np.mean(dices)) if dices else math.nan,
        "mean_iou_original_to_final": float(np.mean(ious)) if ious else math.nan,
        "mask_dice": metrics.dice(session.labels > 0, session.original > 0),
        "edits": int(sum(e.edits for e in session.effort.values())),
        "undo_depth": len(session.history.undo),
        "seconds": round(float(sum(e.seconds for e in session.effort.values())), 3),
        "journal_bytes": (session.folder / "journal.bin").stat().st_size if (session.folder / "journal.bin").exists() else 0,
    }


def effort_csv(rows: Iterable[EffortRow]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EFFORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.row())
    return buf.getvalue()


def write_zarr(labels: np.ndarray, target: str | os.PathLike, chunk: int = 1024) -> Path:
    """The mask as a zarr array folder, written beside the target and swapped in when complete."""
    import tempfile

    import zarr

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        arr = zarr.create_array(store=str(tmp), shape=labels.shape, chunks=(min(chunk, labels.shape[0]), min(chunk, labels.shape[1])), dtype=labels.dtype, overwrite=True)
        arr[...] = labels
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_geojson(session: CorrectionSession, path: str | os.PathLike, object_type: str = "annotation", class_name: str = "glomerulus") -> Path:
    """The final objects as QuPath GeoJSON (level-0 px: a slide region's corner is added back)."""
    from medseg.io.geojson import GeoFeature, write_features
    from medseg.measure.objects import mask_polygons

    region = session.info.get("region")
    ox, oy = (region[0], region[1]) if region else (0, 0)
    features = []
    for oid in session.order():
        obj = session.objects[oid]
        if obj.box is None:
            continue
        y0, x0, y1, x1 = obj.box
        polys = mask_polygons(session.labels[y0:y1, x0:x1] == oid, offset=(y0 + oy, x0 + ox))
        features.append(GeoFeature(polys, object_type, class_name, (0, 230, 118), f"{class_name} {oid}",
                                   {"Area px": float(obj.area), "Confidence": float(obj.confidence)}, None))
    return write_features(features, path, session.mpp)


def export(session: CorrectionSession, out: str | os.PathLike | None = None, formats: Iterable[str] = ("tif", "geojson", "csv", "summary"),
           stem: str = "corrected", object_type: str = "annotation", class_name: str = "glomerulus") -> dict[str, Path]:
    """Write the chosen outputs into ``out`` (default: the session folder); returns format -> path."""
    from medseg.io.images import write_labels

    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"Unknown export format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)}.")
    out = Path(out) if out is not None else session.folder
    if out.exists() and not out.is_dir():
        raise InputError(f"'{out}' is a file: give a folder for the exports.")
    session.mark("export", formats=formats)
    written: dict[str, Path] = {}
    if "tif" in formats:
        written["tif"] = write_labels(out / f"{stem}.tif", session.labels)
    if "zarr" in formats:
        written["zarr"] = write_zarr(session.labels, out / f"{stem}.zarr")
    if "geojson" in formats:
        written["geojson"] = write_geojson(session, out / f"{stem}.geojson", object_type, class_name)
    rows = effort_rows(session) if ("csv" in formats or "summary" in formats) else []
    if "csv" in formats:
        written["csv"] = out / f"{stem}_effort.csv"
        atomic_write_text(written["csv"], effort_csv(rows))
    if "summary" in formats:
        written["summary"] = out / f"{stem}_summary.json"
        atomic_write_text(written["summary"], json.dumps(summary(session, rows), indent=1) + "\n")
    return written


__all__ = ["EFFORT_COLUMNS", "EffortRow", "FORMATS", "effort_csv", "effort_rows", "export", "summary", "write_geojson", "write_zarr"]
