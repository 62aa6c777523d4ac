"""Intrapartum ultrasound, frame by frame: segment with a pack, measure AoP/HSD, write the table.

The one core path behind the Ultrasound dock widget and ``medseg biometry``:

- :func:`measure_frame` / :func:`measure_frames` measure label maps (a frame or a ``(T, H, W)`` stack)
  with the contour method (the IUGC evaluator, :func:`medseg.measure.biometry.aop_hsd`) or the
  ellipse variant (:func:`medseg.measure.ellipse.aop_hsd_ellipse`) and return one
  :class:`FrameMeasurement` per frame; a frame that cannot be measured has a status and a reason, never
  an exception.
- :func:`ultrasound_job` is the long operation as a generator: it segments the image or stack (all
  frames or some) with a pack through :class:`~medseg.engine.Predictor`, yielding progress, then
  measures every segmented frame; it returns an :class:`UltrasoundResult` (labels + rows).
- :func:`write_csv` writes the rows atomically.

The plane class is read from the segmentation (no classifier is involved): ``standard`` when both the
pubic symphysis and the fetal head are present (the IUGC definition of a standard plane: AoP can be
measured), else ``no head``, ``no symphysis`` or ``none``.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medseg.engine.progress import CancelToken, Job, Progress, check_cancel, run_sync
from medseg.errors import InputError, UsageError
from medseg.io.atomic import atomic_write_text
from medseg.measure.biometry import Biometry, aop_hsd
from medseg.measure.ellipse import aop_hsd_ellipse
from medseg.resample import resample_labels

METHODS = ("contour", "ellipse")
DEFAULT_PACK = "ultrasound-fhps"
CSV_COLUMNS = ("stem", "frame", "aop_deg", "hsd_px", "hsd_mm", "status", "reason", "plane", "method",
               "ps_length_px", "vertex_rc", "other_end_rc", "tangent_rc", "hsd_point_rc")
PLANES = ("standard", "no head", "no symphysis", "none")


# --------------------------------------------------------------------------- one frame
@dataclass(frozen=True)
class FrameMeasurement:
    """AoP/HSD of one frame (``biometry.status != "ok"`` when not measurable) with its plane class."""

    stem: str
    frame: int
    method: str
    plane: str
    biometry: Biometry

    @property
    def status(self) -> str:
        return self.biometry.status

    @property
    def ok(self) -> bool:
        return self.biometry.ok

    @property
    def reason(self) -> str:
        return "" if self.ok else self.biometry.reason

    @property
    def aop_deg(self) -> float | None:
        return self.biometry.aop

    @property
    def hsd_px(self) -> float | None:
        """HSD in pixels; given whenever both structures exist, even when AoP is not measurable (no tangent)."""
        return self.biometry.hsd

    @property
    def hsd_mm(self) -> float | None:
        return self.biometry.hsd_mm

    def to_row(self) -> dict[str, Any]:
        """One CSV row: numbers unrounded, points as ``"row col"``; empty where not measured."""
        b = self.biometry
        return {
            "stem": self.stem,
            "frame": self.frame,
            "aop_deg": _num(self.aop_deg),
            "hsd_px": _num(self.hsd_px),
            "hsd_mm": _num(self.hsd_mm),
            "status": self.status,
            "reason": self.reason,
            "plane": self.plane,
            "method": self.method,
            "ps_length_px": _num(b.ps_length),
            "vertex_rc": _point(b.vertex),
            "other_end_rc": _point(b.other_end),
            "tangent_rc": _point(b.tangent),
            "hsd_point_rc": _point(b.hsd_point),
        }


def _num(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def _point(p) -> str:
    if p is None:
        return ""
    return " ".join(str(int(v)) if float(v).is_integer() else f"{float(v):.3f}" for v in p)


def plane_class(labels: np.ndarray, ps_value: int = 1, fh_value: int = 2) -> str:
    """``standard`` when both structures are present, else which one is missing (``none``: both)."""
    has_ps = bool(np.any(labels == ps_value))
    has_fh = bool(np.any(labels == fh_value))
    if has_ps and has_fh:
        return "standard"
    if has_ps:
        return "no head"
    if has_fh:
        return "no symphysis"
    return "none"


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UsageError(f"Unknown biometry method '{method}': use 'contour' (the IUGC evaluator's) or 'ellipse'.")
    return method


def measure_frame(labels: np.ndarray, spacing: Sequence[float] | None = None, method: str = "contour", ps_value: int = 1,
                  fh_value: int = 2, grid: int | None = None) -> Biometry:
    """AoP/HSD of one 2-D label map by ``method``; ``grid`` = N measures on the map resized to N x N
    (nearest neighbour; N = 512 gives IUGC-comparable pixels), points and HSD then in that grid."""
    check_method(method)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InputError(f"A label frame must be 2-D, not shape {labels.shape}: give one frame or a (T, H, W) stack.")
    if grid:
        h, w = labels.shape
        labels = resample_labels(labels, (grid, grid))
        if spacing is not None:
            spacing = (float(spacing[0]) * h / grid, float(spacing[1]) * w / grid)
    fn = aop_hsd if method == "contour" else aop_hsd_ellipse
    return fn(labels, spacing=spacing, ps_value=ps_value, fh_value=fh_value)


def measure_frames(labels: np.ndarray, spacing: Sequence[float] | None = None, method: str = "contour", stem: str = "image",
                   frames: Sequence[int] | None = None, ps_value: int = 1, fh_value: int = 2, grid: int | None = None) -> list[FrameMeasurement]:
    """One :class:`FrameMeasurement` per frame of a 2-D map (frame 0) or a ``(T, H, W)`` stack.

    ``frames`` gives the frame numbers written into the rows (default 0, 1, ...), e.g. when ``labels``
    holds only some frames of a video.
    """
    return run_sync(measure_frames_iter(labels, spacing, method, stem, frames, ps_value, fh_value, grid))


def measure_frames_iter(labels: np.ndarray, spacing: Sequence[float] | None = None, method: str = "contour", stem: str = "image",
                        frames: Sequence[int] | None = None, ps_value: int = 1, fh_value: int = 2, grid: int | None = None,
                        cancel: CancelToken | None = None) -> Job[list[FrameMeasurement]]:
    """:func:`measure_frames` as a generator yielding one :class:`Progress` per frame."""
    check_method(method)
    stack = _as_stack(labels)
    numbers = list(range(len(stack))) if frames is None else [int(f) for f in frames]
    if len(numbers) != len(stack):
        raise InputError(f"{len(numbers)} frame numbers were given for {len(stack)} label frames: give one number per frame.")
    rows: list[FrameMeasurement] = []
    yield Progress(0, len(stack), "measuring")
    for i, (number, frame) in enumerate(zip(numbers, stack)):
        check_cancel(cancel)
        b = measure_frame(frame, spacing, method, ps_value, fh_value, grid)
        rows.append(FrameMeasurement(stem, number, method, plane_class(frame, ps_value, fh_value), b))
        yield Progress(i + 1, len(stack), f"measured frame {number}", partial=rows[-1])
    return rows


def _as_stack(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return arr
    raise InputError(f"Label maps must be (H, W) or (T, H, W), not shape {arr.shape}: give class indices, not colours.")


def structure_values(classes: Iterable[Any]) -> tuple[int, int]:
    """(PS value, FH value) of a pack's classes, by name (``pubic symphysis``/``PS``, ``fetal head``/``FH``); 1, 2 otherwise."""
    ps, fh = 1, 2
    for c in classes:
        name = str(getattr(c, "name", c)).strip().lower()
        value = int(getattr(c, "value", 0))
        if "symphysis" in name or name in ("ps", "pubic"):
            ps = value
        elif "head" in name or name == "fh":
            fh = value
    return ps, fh


# --------------------------------------------------------------------------- segment + measure
@dataclass
class UltrasoundResult:
    """Labels of the segmented frames and one measurement per frame."""

    labels: np.ndarray  # (H, W) for a single image, else (len(frames), H, W)
    frames: list[int]
    rows: list[FrameMeasurement]
    classes: list[Any] = field(default_factory=list)
    pack_id: str = ""
    method: str = "contour"
    seconds: float = 0.0
    spacing: tuple[float, float] | None = None


def ultrasound_job(image, pack, config=None, frames: Sequence[int] | None = None, method: str = "contour",
                   stem: str | None = None, spacing: Sequence[float] | None = None, grid: int | None = None,
                   cancel: CancelToken | None = None) -> Job[UltrasoundResult]:
    """Generator: segment ``image`` (an :class:`~medseg.io.ImageData` or array; some ``frames`` of a stack or
    all) with ``pack`` (a :class:`~medseg.train.packs.Pack` or its name), then measure each frame.

    Yields :class:`Progress` (tiles while segmenting, then frames while measuring); returns an
    :class:`UltrasoundResult`. ``spacing`` (row, col mm) overrides the image's own.
    """
    from medseg.engine.predictor import Predictor
    from medseg.io.images import ImageData, describe_array
    from medseg.train.packs import resolve

    check_method(method)
    t0 = time.perf_counter()
    data = image if isinstance(image, ImageData) else describe_array(np.asarray(image))
    if isinstance(pack, (str, os.PathLike)):
        yield Progress(0, 0, f"loading {pack}")
        pack = resolve(pack)
    predictor = Predictor(pack, config)
    prediction = yield from predictor.predict_iter(data, frames=list(frames) if frames is not None else None, cancel=cancel)
    numbers = list(frames) if frames is not None else (list(range(data.array.shape[0])) if data.is_stack else [0])
    ps_value, fh_value = structure_values(pack.classes)
    use_spacing = tuple(spacing) if spacing is not None else data.spacing
    rows = yield from measure_frames_iter(prediction.labels, use_spacing, method, stem or data.name, numbers, ps_value, fh_value, grid, cancel)
    return UltrasoundResult(prediction.labels, numbers, rows, list(pack.classes), getattr(pack, "id", ""), method,
                            time.perf_counter() - t0, use_spacing)


# --------------------------------------------------------------------------- table
def rows_to_csv(rows: Iterable[FrameMeasurement]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.to_row())
    return buf.getvalue()


def write_csv(rows: Iterable[FrameMeasurement], path: str | os.PathLike) -> Path:
    """Write the table atomically (temporary name, then rename); returns the path."""
    path = Path(path)
    atomic_write_text(path, rows_to_csv(rows))
    return path


def summary(rows: Sequence[FrameMeasurement]) -> str:
    """One line: how many frames were measured, median AoP and HSD, and why the others were not."""
    ok = [r for r in rows if r.ok]
    parts = [f"{len(ok)} of {len(rows)} frames measured"]
    if len(rows) == 1 and ok:
        parts = [f"AoP {ok[0].aop_deg:.1f}°, HSD {ok[0].hsd_px:.1f} px" + (f" ({ok[0].hsd_mm:.1f} mm)" if ok[0].hsd_mm is not None else "")]
    elif ok:
        aops = sorted(r.aop_deg for r in ok)
        hsds = sorted(r.hsd_px for r in ok)
        parts.append(f"median AoP {_median(aops):.1f}°, HSD {_median(hsds):.1f} px")
    failed: dict[str, int] = {}
    for r in rows:
        if not r.ok:
            failed[r.status] = failed.get(r.status, 0) + 1
    if failed:
        parts.append("not measurable: " + ", ".join(f"{k} {v}" for k, v in sorted(failed.items())))
    return "; ".join(parts)


def _median(v: list[float]) -> float:
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


__all__ = [
    "CSV_COLUMNS", "DEFAULT_PACK", "METHODS", "FrameMeasurement", "UltrasoundResult", "measure_frame", "measure_frames",
    "measure_frames_iter", "plane_class", "rows_to_csv", "structure_values", "summary", "ultrasound_job", "write_csv",
]
