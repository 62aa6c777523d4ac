"""Objects of a segmentation: instances, their table, µm² filtering and slide scores (spec §10.3).

Objects are the 8-connected components of each foreground class (as :func:`medseg.metrics.instances`
defines them). On a whole-slide result the components are found chunk by chunk — each chunk labelled
with :func:`medseg.metrics.instances`, components that touch across chunk borders (diagonals included)
joined through a sparse graph — so memory follows the chunk size and the number of objects, not the
slide. Each object is then measured on its own bounding box: area (px and µm²), centroid, perimeter
(:func:`skimage.measure.perimeter`), mean confidence, and its outline as polygons with holes.

Coordinates in the table and the polygons are slide level-0 pixels (x right, y down, origin at the
top-left corner of the top-left pixel), as QuPath uses; areas and perimeters are measured on the
grid the model ran on and converted with its µm/px.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage, sparse

from medseg import metrics
from medseg.errors import InputError
from medseg.io.atomic import atomic_write_text

#: The KPIs scorer's small-object filter (spec §10.3 step 4): components under 20 000 px *at 20x* are
#: removed from predictions. It is a pixel count at 20x, not an area in µm²; :func:`kpis_min_area_px`
#: converts it to another grid when the 20x pixel size is known.
KPIS_MIN_AREA_PX_20X = 20_000

CSV_COLUMNS = ["id", "class", "centroid_x", "centroid_y", "area_um2", "area_px", "perimeter_um", "perimeter_px", "confidence", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]

Ring = list[tuple[float, float]]
Polygon = list[Ring]  # outer ring first, then holes; closed (first point repeated last)


@dataclass
class SlideObject:
    """One object: its class, where it is (slide level-0 px), its size and how sure the model was."""

    id: int
    class_value: int
    class_name: str
    centroid_x: float
    centroid_y: float
    area_px: int  # on the model's grid
    area_um2: float | None
    perimeter_px: float
    perimeter_um: float | None
    confidence: float  # mean probability of the object's pixels, 0..1 (nan when unknown)
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in slide level-0 px
    polygons: list[Polygon] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        x0, y0, x1, y1 = self.bbox
        return {
            "id": self.id,
            "class": self.class_name,
            "centroid_x": round(self.centroid_x, 2),
            "centroid_y": round(self.centroid_y, 2),
            "area_um2": None if self.area_um2 is None else round(self.area_um2, 2),
            "area_px": self.area_px,
            "perimeter_um": None if self.perimeter_um is None else round(self.perimeter_um, 2),
            "perimeter_px": round(self.perimeter_px, 2),
            "confidence": None if math.isnan(self.confidence) else round(self.confidence, 4),
            "bbox_x0": x0,
            "bbox_y0": y0,
            "bbox_x1": x1,
            "bbox_y1": y1,
        }


# --------------------------------------------------------------------------- components, chunk by chunk
@dataclass
class _Components:
    area: np.ndarray
    sum_y: np.ndarray
    sum_x: np.ndarray
    box: np.ndarray  # (n, 4): y0, x0, y1, x1 (exclusive ends)
    seed: np.ndarray  # (n, 2): one pixel (y, x) of the component


def components(labels, value: int, chunk: int = 1024) -> _Components:
    """8-connected components of ``labels == value`` of a 2-D array (numpy or zarr), chunk by chunk."""
    h, w = labels.shape
    areas, sys_, sxs, boxes, seeds = [], [], [], [], []
    edges_a, edges_b = [], []
    offset = 0
    prev_bottom = np.zeros(w, np.int64)  # global ids (1-based, 0 = none) of the row just above
    for r0 in range(0, h, chunk):
        r1 = min(r0 + chunk, h)
        top = np.zeros(w, np.int64)
        bottom = np.zeros(w, np.int64)
        left_col = None
        for c0 in range(0, w, chunk):
            c1 = min(c0 + chunk, w)
            lab = metrics.instances(np.asarray(labels[r0:r1, c0:c1]) == value)
            n = int(lab.max())
            gid = np.where(lab > 0, lab + offset, 0).astype(np.int64)
            if n:
                flat = lab.ravel()
                yy, xx = np.mgrid[r0:r1, c0:c1]
                areas.append(np.bincount(flat, minlength=n + 1)[1:].astype(np.float64))
                sys_.append(np.bincount(flat, weights=yy.ravel().astype(np.float64), minlength=n + 1)[1:])
                sxs.append(np.bincount(flat, weights=xx.ravel().astype(np.float64), minlength=n + 1)[1:])
                sl = ndimage.find_objects(lab)
                boxes.append(np.array([[s[0].start + r0, s[1].start + c0, s[0].stop + r0, s[1].stop + c0] for s in sl], np.int64))
                _, first = np.unique(lab.ravel(), return_index=True)
                first = first[1:] if lab.ravel()[first[0]] == 0 else first
                seeds.append(np.stack([first // lab.shape[1] + r0, first % lab.shape[1] + c0], axis=1))
            if left_col is not None:
                _join(left_col, gid[:, 0], edges_a, edges_b)
            left_col = gid[:, -1]
            top[c0:c1], bottom[c0:c1] = gid[0], gid[-1]
            offset += n
        if r0 > 0:
            _join(prev_bottom, top, edges_a, edges_b)
        prev_bottom = bottom
    if offset == 0:
        return _Components(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros((0, 4), np.int64), np.zeros((0, 2), np.int64))
    area, sy, sx = np.concatenate(areas), np.concatenate(sys_), np.concatenate(sxs)
    box, seed = np.concatenate(boxes), np.concatenate(seeds)
    if not edges_a:
        return _Components(area.astype(np.int64), sy, sx, box, seed)
    a, b = np.concatenate(edges_a) - 1, np.concatenate(edges_b) - 1
    graph = sparse.coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(offset, offset)).tocsr()
    _, root = sparse.csgraph.connected_components(graph, directed=False)
    n = int(root.max()) + 1
    out_box = np.empty((n, 4), np.int64)
    out_box[:, :2] = np.iinfo(np.int64).max
    out_box[:, 2:] = -1
    np.minimum.at(out_box[:, 0], root, box[:, 0])
    np.minimum.at(out_box[:, 1], root, box[:, 1])
    np.maximum.at(out_box[:, 2], root, box[:, 2])
    np.maximum.at(out_box[:, 3], root, box[:, 3])
    _, first = np.unique(root, return_index=True)
    return _Components(
        np.bincount(root, weights=area, minlength=n).round().astype(np.int64),
        np.bincount(root, weights=sy, minlength=n),
        np.bincount(root, weights=sx, minlength=n),
        out_box,
        seed[first],
    )


def _join(upper: np.ndarray, lower: np.ndarray, edges_a: list, edges_b: list) -> None:
    """Record components of two adjacent pixel lines that touch (same position or diagonal)."""
    for shift in (-1, 0, 1):
        if shift < 0:
            u, v = upper[:shift], lower[-shift:]
        elif shift > 0:
            u, v = upper[shift:], lower[:-shift]
        else:
            u, v = upper, lower
        hit = (u > 0) & (v > 0)
        if hit.any():
            edges_a.append(u[hit])
            edges_b.append(v[hit])


# --------------------------------------------------------------------------- measuring
def measure_objects(
    labels,
    confidence=None,
    classes: Sequence[Any] | None = None,
    mpp: float | None = None,
    scale: tuple[float, float] = (1.0, 1.0),
    min_area_px: int = 0,
    min_area_um2: float | None = None,
    chunk: int = 1024,
    outlines: bool = True,
) -> list[SlideObject]:
    """Objects of a label image (numpy or zarr; uint8 class values, 0 = background).

    ``classes``: :class:`~medseg.train.packs.ClassInfo` list (names; background excluded); ``mpp``: µm
    per label pixel; ``scale``: slide level-0 px per label pixel (y, x). Objects smaller than
    ``min_area_px`` label pixels, or than ``min_area_um2`` (needs ``mpp``), are dropped.
    """
    from skimage.measure import perimeter

    names = {int(c.value): str(c.name) for c in classes} if classes else {}
    values = sorted(v for v in names if v != 0) if names else sorted(int(v) for v in np.unique(np.asarray(labels[...])) if v != 0)
    threshold = int(min_area_px)
    if min_area_um2:
        if not mpp:
            raise InputError("A minimum object area in µm² needs the pixel size: give the slide's µm/px (--mpp) or a minimum in pixels.")
        threshold = max(threshold, int(math.ceil(min_area_um2 / (mpp * mpp))))
    sy, sx = scale
    h, w = labels.shape
    objects: list[SlideObject] = []
    label_cache = _ChunkCache(labels, chunk)
    conf_cache = None if confidence is None else _ChunkCache(confidence, chunk)
    for value in values:
        comp = components(labels, value, chunk)
        keep = np.nonzero(comp.area >= max(threshold, 1))[0]
        order = keep[np.lexsort((comp.sum_x[keep] / comp.area[keep], comp.sum_y[keep] / comp.area[keep]))]
        for i in order:
            y0, x0, y1, x1 = (int(v) for v in comp.box[i])
            py0, px0, py1, px1 = max(y0 - 1, 0), max(x0 - 1, 0), min(y1 + 1, h), min(x1 + 1, w)
            crop = label_cache.read(py0, px0, py1, px1) == value
            ids = metrics.instances(crop)
            mask = ids == ids[comp.seed[i][0] - py0, comp.seed[i][1] - px0]
            per = float(perimeter(mask))
            conf = float(conf_cache.read(py0, px0, py1, px1)[mask].mean() / 255.0) if conf_cache is not None else math.nan
            cy, cx = comp.sum_y[i] / comp.area[i], comp.sum_x[i] / comp.area[i]
            area = int(comp.area[i])
            objects.append(
                SlideObject(
                    id=len(objects) + 1,
                    class_value=value,
                    class_name=names.get(value, f"class {value}"),
                    centroid_x=float((cx + 0.5) * sx),
                    centroid_y=float((cy + 0.5) * sy),
                    area_px=area,
                    area_um2=None if mpp is None else area * mpp * mpp,
                    perimeter_px=per,
                    perimeter_um=None if mpp is None else per * mpp,
                    confidence=conf,
                    bbox=(x0 * sx, y0 * sy, x1 * sx, y1 * sy),
                    polygons=mask_polygons(mask, offset=(py0, px0), scale=scale) if outlines else [],
                )
            )
    return objects


class _ChunkCache:
    """Crops of a (zarr) array assembled from whole chunks, the most recently used kept: objects are
    measured in reading order, so each chunk is decoded about once and memory stays bounded."""

    def __init__(self, array, chunk: int, capacity: int = 256) -> None:
        from collections import OrderedDict

        self.array, self.c, self.capacity = array, chunk, capacity
        self.h, self.w = array.shape
        self.cache: OrderedDict = OrderedDict()

    def _chunk(self, r: int, c: int) -> np.ndarray:
        key = (r, c)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        block = np.asarray(self.array[r * self.c : (r + 1) * self.c, c * self.c : (c + 1) * self.c])
        self.cache[key] = block
        if len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return block

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        c = self.c
        r0, r1, c0, c1 = y0 // c, (y1 - 1) // c, x0 // c, (x1 - 1) // c
        if r0 == r1 and c0 == c1:
            return self._chunk(r0, c0)[y0 - r0 * c : y1 - r0 * c, x0 - c0 * c : x1 - c0 * c]
        out = np.empty((y1 - y0, x1 - x0), self._chunk(r0, c0).dtype)
        for r in range(r0, r1 + 1):
            for cc in range(c0, c1 + 1):
                block = self._chunk(r, cc)
                ya, yb = max(y0, r * c), min(y1, r * c + block.shape[0])
                xa, xb = max(x0, cc * c), min(x1, cc * c + block.shape[1])
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = block[ya - r * c : yb - r * c, xa - cc * c : xb - cc * c]
        return out


def mask_polygons(mask: np.ndarray, offset: tuple[int, int] = (0, 0), scale: tuple[float, float] = (1.0, 1.0)) -> list[Polygon]:
    """Outline(s) of a binary mask as polygons with holes, in pixel-corner coordinates (x, y).

    Marching squares at 0.5 on the 8-connected object (outer rings) and on each enclosed background
    region (holes): every pixel centre of the object lies inside, every other outside, so filling
    the polygons by pixel centres gives the mask back exactly. Collinear vertices are dropped.
    """
    from skimage.measure import approximate_polygon, find_contours

    oy, ox = offset
    sy, sx = scale
    filled = ndimage.binary_fill_holes(mask)
    polygons: list[Polygon] = []

    def rings(m: np.ndarray, connected: str) -> list[Ring]:
        out = []
        for contour in find_contours(np.pad(m, 1).astype(np.float32), 0.5, fully_connected=connected):
            contour = approximate_polygon(contour, tolerance=0)
            pts = [(float((c - 1 + 0.5 + ox) * sx), float((r - 1 + 0.5 + oy) * sy)) for r, c in contour]
            if pts[0] != pts[-1]:
                pts.append(pts[0])
            if len(pts) >= 4:
                out.append(pts)
        return out

    parts, n = ndimage.label(filled, structure=metrics.EIGHT)
    holes_lab, n_holes = ndimage.label(filled & ~mask)  # background inside is 4-connected
    for k in range(1, n + 1):
        outer = rings(parts == k, "high")
        if not outer:
            continue
        holes = []
        for j in np.unique(holes_lab[(parts == k) & (holes_lab > 0)]):
            holes.extend(rings(holes_lab == j, "low"))
        polygons.append([max(outer, key=len)] + holes)
    return polygons


def rasterise_polygons(polygons: Sequence[Polygon], shape: tuple[int, int], scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Pixels whose centres lie inside the polygons (holes excluded) on a grid of ``shape`` whose pixels
    are ``scale`` (y, x) level-0 px: the inverse of :func:`mask_polygons`."""
    from skimage.draw import polygon as fill

    sy, sx = scale
    out = np.zeros(shape, bool)
    for poly in polygons:
        for k, ring in enumerate(poly):
            xs = np.array([p[0] for p in ring]) / sx - 0.5
            ys = np.array([p[1] for p in ring]) / sy - 0.5
            rr, cc = fill(ys, xs, shape)
            region = np.zeros(shape, bool)
            region[rr, cc] = True
            out = out | region if k == 0 else out & ~region
    return out


# --------------------------------------------------------------------------- slides
def slide_objects(result, min_area_um2: float | None = None, min_area_px: int = 0, outlines: bool = True) -> list[SlideObject]:
    """Objects of a whole-slide result (:class:`medseg.engine.wsi.SlideResult` or its zarr path)."""
    from medseg.engine.wsi import SlideResult, open_result

    if not isinstance(result, SlideResult):
        result = open_result(result)
    if not result.complete:
        raise InputError(f"'{result.path}' is an unfinished run: run 'medseg wsi' again with the same options to finish it first.")
    root = result.root
    chunk = int(result.info.get("chunk", 512)) * 2
    return measure_objects(root["labels/0"], root["confidence"], [c for c in result.classes if c.value != 0], result.mpp, tuple(result.scale),
                           min_area_px, min_area_um2, chunk, outlines)


def min_area_for(pack, override: float | None = None) -> float:
    """Minimum object area in µm²: ``override`` when given, else the pack's ``postprocess.min_object_area_um2``, else 0."""
    if override is not None:
        return float(override)
    return float(((pack.manifest or {}).get("postprocess") or {}).get("min_object_area_um2") or 0.0)


def kpis_min_area_px(mpp: float | None, mpp_20x: float | None) -> int:
    """The KPIs 20 000 px filter on a grid of ``mpp`` µm/px, given the µm/px of the 20x grid it was set on.

    Without both pixel sizes the filter stays a count of 20 000 pixels (the grid is taken as 20x).
    """
    if not mpp or not mpp_20x:
        return KPIS_MIN_AREA_PX_20X
    return int(math.ceil(KPIS_MIN_AREA_PX_20X * (mpp_20x / mpp) ** 2))


def score_slide(pred: np.ndarray, ref: np.ndarray, min_area_px: int = 0, iou_threshold: float = 0.5) -> dict[str, float]:
    """Slide Dice and detection F1 at IoU >= 0.5 against a reference mask (spec §10.3 steps 4-8).

    Predicted components under ``min_area_px`` are removed before both scores; the reference is never
    filtered. Dice of two empty masks is 1; F1 follows the organisers' empty-case rules (0 without
    reference objects). Both come from :mod:`medseg.metrics`.
    """
    pred = np.asarray(pred) > 0
    ref = np.asarray(ref) > 0
    filtered = metrics.instances(pred, min_area_px) > 0 if min_area_px > 0 else pred
    objects = metrics.object_f1(pred, ref, iou_threshold=iou_threshold, min_area=min_area_px)
    return {"dice": metrics.dice(filtered, ref), **{k: v for k, v in objects.to_dict().items()}}


# --------------------------------------------------------------------------- tables
def objects_csv(objects: Sequence[SlideObject]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for o in objects:
        writer.writerow({k: ("" if v is None else v) for k, v in o.row().items()})
    return buf.getvalue()


def write_csv(objects: Sequence[SlideObject], path: str | os.PathLike) -> Path:
    """The object table as CSV (one row per object, coordinates in slide level-0 px), written atomically."""
    path = Path(path)
    atomic_write_text(path, objects_csv(objects))
    return path


__all__ = [
    "CSV_COLUMNS",
    "KPIS_MIN_AREA_PX_20X",
    "SlideObject",
    "components",
    "kpis_min_area_px",
    "mask_polygons",
    "measure_objects",
    "min_area_for",
    "objects_csv",
    "rasterise_polygons",
    "score_slide",
    "slide_objects",
    "write_csv",
]
