"""GeoJSON that QuPath imports and exports: a FeatureCollection of Features, one per object.

Each Feature has a Polygon (or MultiPolygon) geometry in slide level-0 pixel coordinates (x right,
y down, origin at the top-left corner of the image, as QuPath's ROIs), rings closed, holes after
the outer ring; and properties ``objectType`` (``"annotation"`` or ``"detection"``),
``classification`` (``{"name", "color": [r, g, b]}``), ``name`` and ``measurements`` (a name ->
number mapping, as QuPath 0.4+ writes; the older list of ``{"name", "value"}`` is read too).

Reading accepts a FeatureCollection, a bare list of Features (older QuPath exports) or one Feature;
geometries other than polygons (points, lines) are skipped and counted. Writes are atomic.
medseg adds one foreign member to the collection, ``"medseg": {"mpp": ...}``, so a reader can put
the shapes at the slide's scale; QuPath ignores it.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from medseg.errors import InputError, UsageError
from medseg.io.atomic import atomic_write_text

OBJECT_TYPES = ("annotation", "detection")
Ring = list[tuple[float, float]]
Polygon = list[Ring]


@dataclass
class GeoFeature:
    """One Feature: polygons with holes (level-0 px), QuPath object type, class name and colour, measurements."""

    polygons: list[Polygon]
    object_type: str = "detection"
    class_name: str | None = None
    color: tuple[int, int, int] | None = None
    name: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    id: str | None = None

    def to_feature(self) -> dict[str, Any]:
        if self.object_type not in OBJECT_TYPES:
            raise UsageError(f"QuPath object type '{self.object_type}' is unknown: use 'annotation' or 'detection'.")
        coords = [[[list(map(float, p)) for p in ring] for ring in poly] for poly in self.polygons]
        geometry = {"type": "Polygon", "coordinates": coords[0]} if len(coords) == 1 else {"type": "MultiPolygon", "coordinates": coords}
        props: dict[str, Any] = {"objectType": self.object_type}
        if self.name:
            props["name"] = self.name
        if self.class_name:
            props["classification"] = {"name": self.class_name, "color": list(self.color or (255, 0, 0))}
        if self.measurements:
            props["measurements"] = {k: float(v) for k, v in self.measurements.items()}
        return {"type": "Feature", "id": self.id or str(uuid.uuid4()), "geometry": geometry, "properties": props}


def hex_to_rgb(color: str | Sequence[int] | None) -> tuple[int, int, int] | None:
    if color is None:
        return None
    if isinstance(color, str):
        c = color.lstrip("#")
        if len(c) == 3:
            c = "".join(ch * 2 for ch in c)
        return (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16))
    vals = list(color)[:3]
    if all(isinstance(v, float) and v <= 1.0 for v in vals):
        return tuple(int(round(v * 255)) for v in vals)  # type: ignore[return-value]
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


def objects_to_features(objects: Iterable[Any], classes: Sequence[Any] | None = None, object_type: str = "detection", namespace: str = "medseg") -> list[GeoFeature]:
    """:class:`medseg.measure.objects.SlideObject` s as :class:`GeoFeature` s with QuPath measurements."""
    colours = {int(c.value): hex_to_rgb(c.color) for c in classes or []}
    out = []
    for o in objects:
        m: dict[str, float] = {"Area px": float(o.area_px), "Perimeter px": float(o.perimeter_px), "Centroid X px": o.centroid_x, "Centroid Y px": o.centroid_y}
        if o.area_um2 is not None:
            m["Area µm^2"] = float(o.area_um2)
        if o.perimeter_um is not None:
            m["Perimeter µm"] = float(o.perimeter_um)
        if o.confidence == o.confidence:  # not NaN
            m["Confidence"] = float(o.confidence)
        out.append(
            GeoFeature(
                polygons=o.polygons,
                object_type=object_type,
                class_name=o.class_name,
                color=colours.get(o.class_value),
                name=f"{o.class_name} {o.id}",
                measurements=m,
                id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{o.class_value}/{o.id}/{o.centroid_x:.2f}/{o.centroid_y:.2f}")),
            )
        )
    return out


def to_geojson(features: Iterable[GeoFeature], mpp: float | None = None) -> dict[str, Any]:
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": [f.to_feature() for f in features]}
    if mpp:
        collection["medseg"] = {"mpp": float(mpp), "coordinates": "level-0 pixels"}
    return collection


def write_features(features: Iterable[GeoFeature], path: str | os.PathLike, mpp: float | None = None) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(to_geojson(features, mpp), ensure_ascii=False) + "\n")
    return path


def write_geojson(objects: Iterable[Any], path: str | os.PathLike, classes: Sequence[Any] | None = None, object_type: str = "detection", mpp: float | None = None) -> Path:
    """Objects (:func:`medseg.measure.objects.slide_objects`) as a QuPath GeoJSON FeatureCollection."""
    return write_features(objects_to_features(objects, classes, object_type, namespace=Path(path).name), path, mpp)


def read_geojson(path: str | os.PathLike) -> tuple[list[GeoFeature], dict[str, Any]]:
    """Features of a QuPath (or any polygon) GeoJSON file and collection-level information
    (``mpp`` when medseg wrote it, ``skipped`` = number of non-polygon features)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"'{path}' does not exist: check the path.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"'{path.name}' is not valid GeoJSON ({exc}): export it again from QuPath (File > Export objects as GeoJSON).") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        items = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        items = [data]
    elif isinstance(data, list):
        items = data
    else:
        raise InputError(f"'{path.name}' holds no GeoJSON features (expected a FeatureCollection, a Feature or a list of Features).")
    features, skipped = [], 0
    for item in items:
        try:
            feature = _parse_feature(item)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"'{path.name}' has a malformed feature ({type(exc).__name__}: {exc}): check the file.") from exc
        if feature is None:
            skipped += 1
        else:
            features.append(feature)
    info = {"skipped": skipped, "mpp": (data.get("medseg") or {}).get("mpp") if isinstance(data, dict) else None}
    return features, info


def _parse_feature(item: dict[str, Any]) -> GeoFeature | None:
    geom = item.get("geometry") or {}
    kind = geom.get("type")
    if kind == "Polygon":
        polys = [geom["coordinates"]]
    elif kind == "MultiPolygon":
        polys = geom["coordinates"]
    else:
        return None
    polygons = [[[(float(p[0]), float(p[1])) for p in ring] for ring in poly] for poly in polys if poly]
    props = item.get("properties") or {}
    cls = props.get("classification") or {}
    if isinstance(cls, str):
        cls = {"name": cls}
    measurements = props.get("measurements") or {}
    if isinstance(measurements, list):  # QuPath <= 0.3: [{"name": ..., "value": ...}]
        measurements = {m["name"]: m["value"] for m in measurements if isinstance(m, dict) and "name" in m}
    object_type = props.get("objectType") or ("detection" if props.get("isDetection") else "annotation")
    return GeoFeature(
        polygons=polygons,
        object_type=str(object_type),
        class_name=cls.get("name"),
        color=hex_to_rgb(cls.get("color") or cls.get("colorRGB") and _int_colour(cls["colorRGB"])),
        name=props.get("name"),
        measurements={str(k): float(v) for k, v in measurements.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        id=item.get("id"),
    )


def _int_colour(value: int) -> tuple[int, int, int]:
    value &= 0xFFFFFF
    return (value >> 16 & 255, value >> 8 & 255, value & 255)


__all__ = ["GeoFeature", "OBJECT_TYPES", "hex_to_rgb", "objects_to_features", "read_geojson", "to_geojson", "write_features", "write_geojson"]
