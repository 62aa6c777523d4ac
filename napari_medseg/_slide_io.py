"""Reader and writer contributions for whole slides, slide results and QuPath GeoJSON, wrapping medseg.io.

- Slides (SVS, NDPI, MRXS, SCN, BIF, tiled/pyramidal TIFF and OME-TIFF) open as one lazy multiscale RGB
  image layer: each level is a dask array read tile by tile, so napari decodes only what is on screen.
  The layer's scale is the level-0 pixel size in µm (1 when the slide does not record one) and its
  metadata names the file, levels, µm/px and associated images (open those with
  :func:`associated_layer`). Plain single-level TIFFs are left to the 2-D image reader.
- A ``medseg wsi`` result folder (``*.zarr``) opens as a multiscale Labels layer at the slide's scale.
- GeoJSON opens as a Shapes layer in slide level-0 pixels (scaled by µm/px when the file says so):
  one polygon per ring, with a features table (object, ring, objectType, class, colour, name,
  measurements) from which the writer rebuilds the same Features, holes included.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medseg.io.slides import SLIDE_SUFFIXES, is_slide, open_slide

LayerData = tuple[Any, dict[str, Any], str]
GEOJSON_SUFFIXES = (".geojson", ".json")
_MEASUREMENT = "measurement: "


def _paths(path) -> list[str]:
    return [os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]


# --------------------------------------------------------------------------- slides
def get_slide_reader(path: str | list[str]) -> Callable | None:
    """Accept slide files (tiled or pyramidal TIFFs only; vendor formats OpenSlide detects)."""
    paths = _paths(path)
    if not paths or not all(p.lower().endswith(SLIDE_SUFFIXES) and is_slide(p) for p in paths):
        return None
    return read_slides


def read_slides(path: str | list[str]) -> list[LayerData]:
    return [slide_layer_data(p) for p in _paths(path)]


def slide_layer_data(path: str | os.PathLike, mpp: float | None = None) -> LayerData:
    """``(levels, kwargs, "image")`` of a slide: multiscale, RGB, µm scale, description in metadata."""
    slide = open_slide(path, mpp=mpp)
    scale = (slide.mpp_xy[1], slide.mpp_xy[0]) if slide.mpp_xy else (1.0, 1.0)
    metadata = {
        "medseg": {
            "slide_path": str(Path(path).resolve()),
            "mpp": slide.mpp,
            "units": "µm" if slide.mpp else "pixels",
            "vendor": slide.vendor,
            "backend": slide.backend,
            "levels": [{"shape": list(lv.shape), "downsample": lv.downsample, "mpp": slide.level_mpp(lv.index)} for lv in slide.levels],
            "associated_images": slide.associated_names,
        }
    }
    kwargs = {"rgb": True, "multiscale": slide.level_count > 1, "scale": scale, "name": slide.name, "metadata": metadata, "contrast_limits": (0, 255)}
    data = slide.pyramid() if slide.level_count > 1 else slide.level_array(0)
    return data, kwargs, "image"


def associated_layer(path: str | os.PathLike, name: str) -> LayerData:
    """An associated image (``label``, ``macro``, ``thumbnail``) of a slide as a plain RGB image layer."""
    with open_slide(path) as slide:
        image = slide.associated_image(name)
        return image, {"rgb": True, "name": f"{slide.name} {name}"}, "image"


# --------------------------------------------------------------------------- slide results
def get_result_reader(path: str | list[str]) -> Callable | None:
    paths = _paths(path)
    if not paths or not all(Path(p).is_dir() and (Path(p) / "zarr.json").is_file() and _is_result(p) for p in paths):
        return None
    return read_results


def _is_result(path: str) -> bool:
    import json

    try:
        meta = json.loads((Path(path) / "zarr.json").read_text(encoding="utf-8"))
        return "medseg" in (meta.get("attributes") or {})
    except (OSError, ValueError):
        return False


def read_results(path: str | list[str]) -> list[LayerData]:
    return [result_layer_data(p) for p in _paths(path)]


def result_layer_data(path: str | os.PathLike, name: str | None = None) -> LayerData:
    """``(label levels, kwargs, "labels")`` of a ``medseg wsi`` result at the slide layer's scale."""
    from medseg.engine.wsi import open_result

    result = open_result(path)
    levels = result.pyramid()
    sy, sx = result.scale
    mpp = result.info.get("slide_mpp")
    unit = mpp or 1.0
    colours: dict[Any, Any] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    colours.update({c.value: c.color for c in result.classes if c.value != 0})
    from napari.utils.colormaps import DirectLabelColormap

    kwargs = {
        "name": name or f"{Path(path).stem}",
        "multiscale": len(levels) > 1,
        "scale": (sy * unit, sx * unit),
        "translate": ((sy - 1) / 2 * unit, (sx - 1) / 2 * unit),  # output pixel centres over the level-0 pixels they cover
        "colormap": DirectLabelColormap(color_dict=colours),
        "opacity": 0.5,
        "metadata": {"medseg": {"result_path": str(Path(path).resolve()), **{k: v for k, v in result.info.items() if k != "run"}}},
    }
    return (levels if len(levels) > 1 else levels[0]), kwargs, "labels"


# --------------------------------------------------------------------------- GeoJSON
def get_geojson_reader(path: str | list[str]) -> Callable | None:
    paths = _paths(path)
    if not paths or not all(p.lower().endswith(GEOJSON_SUFFIXES) and Path(p).is_file() for p in paths):
        return None
    if any(p.lower().endswith(".json") and not _looks_like_geojson(p) for p in paths):
        return None
    return read_geojson_layers


def _looks_like_geojson(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    return b'"Feature' in head or b'"geometry"' in head


def read_geojson_layers(path: str | list[str]) -> list[LayerData]:
    return [geojson_layer_data(p) for p in _paths(path)]


def geojson_layer_data(path: str | os.PathLike, mpp: float | None = None) -> LayerData:
    """A Shapes layer of the polygons (rows = rings, ``(y, x)`` level-0 px) with their properties as features."""
    from medseg.io.geojson import read_geojson

    features, info = read_geojson(path)
    mpp = mpp or info.get("mpp")
    data, rows, colours = [], [], []
    measurement_names = sorted({k for f in features for k in f.measurements})
    for i, f in enumerate(features):
        rgb = f.color or (255, 255, 0)
        for p, poly in enumerate(f.polygons):
            for r, ring in enumerate(poly):
                pts = np.asarray(ring, float)
                if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
                    pts = pts[:-1]
                data.append(pts[:, ::-1])
                row = {"object": i, "part": p, "ring": "outer" if r == 0 else "hole", "objectType": f.object_type, "class": f.class_name or "",
                       "color": "#%02x%02x%02x" % tuple(rgb), "name": f.name or "", "id": f.id or ""}
                row.update({_MEASUREMENT + k: f.measurements.get(k, np.nan) for k in measurement_names})
                rows.append(row)
                colours.append(tuple(c / 255 for c in rgb) + (1.0,))
    import pandas as pd

    kwargs = {
        "name": Path(path).stem,
        "shape_type": "polygon",
        "features": pd.DataFrame(rows),
        "edge_color": colours or "yellow",
        "face_color": "transparent",
        "edge_width": 2,
        "scale": (mpp or 1.0, mpp or 1.0),
        "translate": (-0.5 * (mpp or 1.0), -0.5 * (mpp or 1.0)),  # corner coordinates over pixel-centred image layers
        "metadata": {"medseg": {"geojson": str(path), "mpp": mpp, "skipped_features": info["skipped"], "coordinates": "level-0 pixels"}},
    }
    return data, kwargs, "shapes"


def write_geojson_layer(path: str, data: list[np.ndarray], meta: dict[str, Any]) -> list[str]:
    """Writer contribution: a Shapes layer as QuPath GeoJSON (rings regrouped into Features by the
    ``object``/``part``/``ring`` features the reader made; other shapes become one annotation each)."""
    import pandas as pd

    from medseg.io.geojson import GeoFeature, hex_to_rgb, write_features

    feats = meta.get("features")
    table = pd.DataFrame(feats) if feats is not None else pd.DataFrame()
    types = meta.get("shape_type") or ["polygon"] * len(data)
    mpp = (meta.get("metadata") or {}).get("medseg", {}).get("mpp")
    grouped: dict[Any, dict[str, Any]] = {}
    order: list[Any] = []
    for k, shape in enumerate(data):
        ring = [(float(x), float(y)) for y, x in _outline(np.asarray(shape)[:, -2:], types[k] if k < len(types) else "polygon")]
        ring.append(ring[0])
        row = table.iloc[k].to_dict() if k < len(table) and "object" in table else {}
        key = row.get("object", f"shape-{k}")
        if key not in grouped:
            measurements = {c[len(_MEASUREMENT) :]: float(v) for c, v in row.items() if c.startswith(_MEASUREMENT) and v == v}
            grouped[key] = {"parts": {}, "feature": GeoFeature(
                polygons=[], object_type=row.get("objectType") or "annotation", class_name=row.get("class") or None,
                color=hex_to_rgb(row["color"]) if row.get("color") else None, name=row.get("name") or None,
                measurements=measurements, id=row.get("id") or None)}
            order.append(key)
        rings = grouped[key]["parts"].setdefault(row.get("part", 0), [])
        if row.get("ring", "outer") == "outer":
            rings.insert(0, ring)
        else:
            rings.append(ring)
    features = []
    for key in order:
        g = grouped[key]
        g["feature"].polygons = [g["parts"][p] for p in sorted(g["parts"])]
        features.append(g["feature"])
    write_features(features, path, mpp)
    return [path]


def _outline(points: np.ndarray, shape_type: str) -> np.ndarray:
    """Vertices of a napari shape; ellipses become 64-gons (GeoJSON has no ellipses, as in QuPath)."""
    if shape_type == "ellipse":
        centre = points.mean(axis=0)
        radii = np.abs(points - centre).max(axis=0)
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([centre[0] + radii[0] * np.sin(t), centre[1] + radii[1] * np.cos(t)], axis=1)
    return points


__all__ = [
    "associated_layer",
    "geojson_layer_data",
    "get_geojson_reader",
    "get_result_reader",
    "get_slide_reader",
    "result_layer_data",
    "slide_layer_data",
    "write_geojson_layer",
]
