"""Edits of an instance mask as region diffs: each edit is computed on the objects' bounding boxes only
and returned as a :class:`Diff` (top-left corner, old patch, new patch) cropped to the pixels that change.

A diff is what undo, redo and the journal store, so an edit on a 10 000 x 10 000 mask costs what its
region costs, never a copy of the mask. The functions here compute diffs and do not apply them;
:class:`medseg.annotate.session.CorrectionSession` applies, records and journals them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage.draw import line as draw_line
from skimage.draw import polygon as fill_polygon
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from medseg import metrics
from medseg.errors import InputError

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive ends)


@dataclass
class Diff:
    """A rectangular change of the mask: ``labels[y0:y0+h, x0:x0+w]`` goes from ``old`` to ``new``."""

    y0: int
    x0: int
    old: np.ndarray
    new: np.ndarray

    @property
    def box(self) -> Box:
        return (self.y0, self.x0, self.y0 + self.old.shape[0], self.x0 + self.old.shape[1])

    @property
    def slices(self) -> tuple[slice, slice]:
        y0, x0, y1, x1 = self.box
        return slice(y0, y1), slice(x0, x1)

    @property
    def nbytes(self) -> int:
        return int(self.old.nbytes + self.new.nbytes)

    def apply(self, labels: np.ndarray) -> None:
        labels[self.slices] = self.new

    def revert(self, labels: np.ndarray) -> None:
        labels[self.slices] = self.old


def make_diff(y0: int, x0: int, old: np.ndarray, new: np.ndarray) -> Diff | None:
    """The diff of two patches at ``(y0, x0)``, cropped to the rows and columns that change (None if none do)."""
    changed = old != new
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return Diff(y0 + r0, x0 + c0, np.ascontiguousarray(old[r0:r1, c0:c1]), np.ascontiguousarray(new[r0:r1, c0:c1]))


def union_box(*boxes: Box | None) -> Box:
    real = [b for b in boxes if b is not None]
    return (min(b[0] for b in real), min(b[1] for b in real), max(b[2] for b in real), max(b[3] for b in real))


def pad_box(box: Box, pad: int, shape: tuple[int, int]) -> Box:
    y0, x0, y1, x1 = box
    return (max(0, y0 - pad), max(0, x0 - pad), min(shape[0], y1 + pad), min(shape[1], x1 + pad))


def tight_box(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> Box | None:
    """Bounding box of the true pixels of ``mask`` (shifted by ``offset``), None when there are none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (int(rows[0]) + offset[0], int(cols[0]) + offset[1], int(rows[-1]) + 1 + offset[0], int(cols[-1]) + 1 + offset[1])


def _patch(labels: np.ndarray, box: Box) -> np.ndarray:
    y0, x0, y1, x1 = box
    return np.array(labels[y0:y1, x0:x1], copy=True)


# --------------------------------------------------------------------------- the edits
def delete(labels: np.ndarray, oid: int, box: Box) -> Diff | None:
    """Remove object ``oid`` (reject)."""
    old = _patch(labels, box)
    new = old.copy()
    new[new == oid] = 0
    return make_diff(box[0], box[1], old, new)


def merge(labels: np.ndarray, keep: int, other: int, box_keep: Box, box_other: Box) -> Diff | None:
    """Give the pixels of ``other`` to ``keep``."""
    box = union_box(box_keep, box_other)
    old = _patch(labels, box)
    new = old.copy()
    new[new == other] = keep
    return make_diff(box[0], box[1], old, new)


def fill_holes(labels: np.ndarray, oid: int, box: Box) -> Diff | None:
    """Fill the background holes inside object ``oid`` (other objects inside it are left alone)."""
    old = _patch(labels, box)
    obj = old == oid
    filled = ndimage.binary_fill_holes(obj)
    new = old.copy()
    new[filled & (old == 0)] = oid
    return make_diff(box[0], box[1], old, new)


def repaint(labels: np.ndarray, y0: int, x0: int, patch: np.ndarray) -> Diff | None:
    """Any region patch written at ``(y0, x0)``: brush strokes, erasing, the viewer's paint tools."""
    h, w = patch.shape
    if y0 < 0 or x0 < 0 or y0 + h > labels.shape[0] or x0 + w > labels.shape[1]:
        raise InputError(f"The painted patch at ({y0}, {x0}) of size {h}x{w} lies outside the {labels.shape[0]}x{labels.shape[1]} mask: paint inside the image.")
    old = _patch(labels, (y0, x0, y0 + h, x0 + w))
    return make_diff(y0, x0, old, np.asarray(patch, dtype=labels.dtype))


def redraw(labels: np.ndarray, oid: int, box: Box | None, polygon_yx: Sequence[Sequence[float]]) -> Diff | None:
    """Replace object ``oid``'s shape by a drawn polygon (row, col vertices); other objects keep their pixels."""
    pts = np.asarray(polygon_yx, dtype=float)
    if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2:
        raise InputError("A redrawn outline needs at least three (row, column) points: draw a closed shape around the object.")
    h, w = labels.shape
    pbox = (max(0, int(np.floor(pts[:, 0].min()))), max(0, int(np.floor(pts[:, 1].min()))), min(h, int(np.ceil(pts[:, 0].max())) + 1), min(w, int(np.ceil(pts[:, 1].max())) + 1))
    if pbox[0] >= pbox[2] or pbox[1] >= pbox[3]:
        raise InputError("The redrawn outline lies outside the image: draw it over the object.")
    region = union_box(box, pbox)
    old = _patch(labels, region)
    new = old.copy()
    new[new == oid] = 0
    rr, cc = fill_polygon(pts[:, 0] - region[0], pts[:, 1] - region[1], shape=old.shape)
    inside = np.zeros(old.shape, bool)
    inside[rr, cc] = True
    new[inside & (new == 0)] = oid
    return make_diff(region[0], region[1], old, new)


def _assign_parts(old: np.ndarray, obj: np.ndarray, parts: np.ndarray, oid: int, new_ids: Sequence[int], what: str) -> np.ndarray:
    """Patch with ``obj`` pixels relabelled by ``parts`` (1..n, 0 = unassigned -> nearest part): the largest
    part keeps ``oid``, the others take ``new_ids`` in order of size."""
    n = int(parts.max())
    if n < 2:
        raise InputError(f"{what} does not cut object {oid} in two: {'draw the line across the object from edge to edge' if 'line' in what else 'split it by a drawn line instead'}.")
    if (obj & (parts == 0)).any():  # pixels under the cut go to the nearest part
        _, (iy, ix) = ndimage.distance_transform_edt(parts == 0, return_indices=True)
        parts = np.where(obj, parts[iy, ix], 0)
    sizes = np.bincount(parts[obj], minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable") + 1
    if len(new_ids) < n - 1:
        raise InputError(f"Object {oid} falls into {n} parts but only {len(new_ids)} new ids were given.")
    lut = np.zeros(n + 1, dtype=old.dtype)
    lut[order[0]] = oid
    for k, part in enumerate(order[1:]):
        lut[part] = new_ids[k]
    new = old.copy()
    new[obj] = lut[parts[obj]]
    return new


def split_line(labels: np.ndarray, oid: int, box: Box, line_yx: Sequence[Sequence[float]], new_ids: Sequence[int]) -> Diff | None:
    """Cut object ``oid`` along a drawn polyline (row, col vertices) into its 8-connected parts."""
    pts = np.asarray(line_yx, dtype=float).round().astype(np.int64)
    if pts.ndim != 2 or pts.shape[0] < 2 or pts.shape[1] != 2:
        raise InputError("A cutting line needs at least two (row, column) points: draw a line across the object.")
    region = pad_box(box, 1, labels.shape)
    old = _patch(labels, region)
    obj = old == oid
    cut = np.zeros(old.shape, bool)
    for (r0, c0), (r1, c1) in zip(pts[:-1] - region[:2], pts[1:] - region[:2]):
        rr, cc = draw_line(int(r0), int(c0), int(r1), int(c1))
        keep = (rr >= 0) & (rr < old.shape[0]) & (cc >= 0) & (cc < old.shape[1])
        cut[rr[keep], cc[keep]] = True
    cut = ndimage.binary_dilation(cut, structure=ndimage.generate_binary_structure(2, 1))  # 4-connected: no diagonal leak
    parts = metrics.instances(obj & ~cut)
    new = _assign_parts(old, obj, parts, oid, new_ids, "The line")
    return make_diff(region[0], region[1], old, new)


def split_watershed(labels: np.ndarray, oid: int, box: Box, new_ids: Sequence[int], parts: int = 2) -> Diff | None:
    """Split object ``oid`` into ``parts`` pieces by a watershed on its distance transform, seeded at the
    ``parts`` highest distance peaks (the centres of the touching round objects)."""
    region = pad_box(box, 1, labels.shape)
    old = _patch(labels, region)
    obj = old == oid
    dist = ndimage.distance_transform_edt(obj)
    radius = float(dist.max())
    peaks = peak_local_max(dist, min_distance=max(1, int(radius * 0.5)), labels=obj.astype(np.int32), num_peaks=parts, exclude_border=False)
    if len(peaks) < 2:
        raise InputError(f"Object {oid} has no waist for a watershed split: split it by a drawn line instead.")
    markers = np.zeros(old.shape, np.int32)
    for k, (r, c) in enumerate(peaks, start=1):
        markers[r, c] = k
    pieces = watershed(-dist, markers, mask=obj)
    new = _assign_parts(old, obj, pieces, oid, new_ids, "The watershed")
    return make_diff(region[0], region[1], old, new)


__all__ = ["Box", "Diff", "delete", "fill_holes", "make_diff", "merge", "pad_box", "redraw", "repaint", "split_line", "split_watershed", "tight_box", "union_box"]
