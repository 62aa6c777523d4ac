"""QuPath GeoJSON: objects of a slide result written and read back with every polygon (holes
included) intact, QuPath's own variants read, bad files refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg import metrics
from medseg.engine.wsi import SlideConfig, segment_slide
from medseg.errors import InputError
from medseg.io.geojson import GeoFeature, read_geojson, write_features, write_geojson
from medseg.measure.objects import mask_polygons, measure_objects, rasterise_polygons, slide_objects
from medseg.train.packs import ClassInfo
from tests.slide_fixtures import oracle_pack, write_mosaic_slide

CLASSES = [ClassInfo(1, "Glomerulus", "#00ff00")]


def test_slide_objects_round_trip_through_geojson(tmp_path):
    path, _, ref = write_mosaic_slide(tmp_path, oracle_levels=True)
    # run at level 1 so that coordinates must be scaled to level 0
    result = segment_slide(path, oracle_pack(mpp=3.4, tile=64), tmp_path / "o.zarr", SlideConfig(device="cpu", chunk=64, tissue=False))
    assert result.scale == (2.0, 2.0)
    objects = slide_objects(result)
    out = write_geojson(objects, tmp_path / "objects.geojson", result.classes, mpp=result.mpp)
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(objects) > 0
    first = data["features"][0]
    assert first["properties"]["objectType"] == "detection"
    assert first["properties"]["classification"] == {"name": "glomerulus", "color": [0, 255, 0]}
    assert {"Area µm^2", "Perimeter µm", "Confidence"} <= set(first["properties"]["measurements"])
    ring = first["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]

    features, info = read_geojson(out)
    assert info == {"skipped": 0, "mpp": pytest.approx(result.mpp)}
    labels = result.labels[...]
    np.testing.assert_array_equal(labels, ref[::2, ::2])
    ids = metrics.instances(labels)
    for obj, feat in zip(objects, features):
        assert feat.polygons == [[[tuple(p) for p in ring] for ring in poly] for poly in obj.polygons]  # every vertex kept
        assert feat.measurements["Area px"] == obj.area_px and feat.class_name == "glomerulus"
        back = rasterise_polygons(feat.polygons, labels.shape, scale=result.scale)
        y, x = np.argwhere(back)[0]
        np.testing.assert_array_equal(back, ids == ids[y, x])  # the polygons fill exactly the object's pixels
        x0, y0, x1, y1 = obj.bbox
        xs = [p[0] for p in feat.polygons[0][0]]
        assert x0 <= min(xs) and max(xs) <= x1  # level-0 coordinates


def test_polygons_with_holes_and_objects_inside_holes():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:35, 5:35] = 1
    mask[10:30, 10:30] = 0  # hole
    mask[15:25, 15:25] = 1  # island in the hole: a second object
    mask[10, 10] = 1  # a pixel in the hole's corner: part of the ring
    mask[0, 0] = mask[1, 1] = 1  # diagonal pair: one 8-connected object
    objs = measure_objects(mask, classes=[ClassInfo(1, "x", "#ff0000")])
    assert len(objs) == 3
    ring = next(o for o in objs if o.area_px > 400)
    assert len(ring.polygons) == 1 and len(ring.polygons[0]) == 2  # outer ring + one hole
    ids = metrics.instances(mask)
    for o in objs:
        back = rasterise_polygons(o.polygons, mask.shape)
        y, x = np.argwhere(back)[0]
        np.testing.assert_array_equal(back, ids == ids[y, x])


def test_round_trip_keeps_holes_types_and_colours(tmp_path):
    mask = np.zeros((30, 30), bool)
    mask[2:28, 2:28] = True
    mask[8:20, 8:20] = False
    polys = mask_polygons(mask)
    feats = [GeoFeature(polys, "annotation", "Tissue", (10, 20, 30), "t1", {"Area µm^2": 1.5}), GeoFeature(polys, "detection", None)]
    path = write_features(feats, tmp_path / "a.geojson")
    back, _ = read_geojson(path)
    assert [(f.object_type, f.class_name, f.color, f.name, f.measurements) for f in back] == [
        ("annotation", "Tissue", (10, 20, 30), "t1", {"Area µm^2": 1.5}),
        ("detection", None, None, None, {}),
    ]
    assert back[0].polygons == polys and len(back[0].polygons[0]) == 2
    np.testing.assert_array_equal(rasterise_polygons(back[0].polygons, mask.shape), mask)


def test_reads_qupath_variants(tmp_path):
    square = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    old_style = [  # QuPath 0.2/0.3: a bare list, measurements as a list, colour as packed RGB
        {"type": "Feature", "id": "PathAnnotationObject", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}, "isLocked": False,
                        "measurements": [{"name": "Area", "value": 100.0}]}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [square, square]}, "properties": {"objectType": "detection"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}},
    ]
    (tmp_path / "old.json").write_text(json.dumps(old_style))
    feats, info = read_geojson(tmp_path / "old.json")
    assert info["skipped"] == 1 and len(feats) == 2
    assert feats[0].object_type == "annotation" and feats[0].class_name == "Tumor" and feats[0].color == (200, 0, 0)
    assert feats[0].measurements == {"Area": 100.0}
    assert len(feats[1].polygons) == 2 and feats[1].object_type == "detection"


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(InputError, match="not valid GeoJSON"):
        read_geojson(tmp_path / "bad.geojson")
    (tmp_path / "other.geojson").write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(InputError, match="holds no GeoJSON features"):
        read_geojson(tmp_path / "other.geojson")
    with pytest.raises(InputError, match="does not exist"):
        read_geojson(tmp_path / "missing.geojson")


@pytest.mark.parametrize("seed", range(4))
def test_every_random_object_round_trips_exactly(seed):
    """Noisy masks (diagonal contacts, holes, islands in holes): each object's polygons fill exactly its pixels."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(70, 90)), 0.7)
    mask = (noise > np.quantile(noise, 0.5)).astype(np.uint8)
    ids = metrics.instances(mask)
    objects = measure_objects(mask)
    assert len(objects) == ids.max()
    for o in objects:
        back = rasterise_polygons(o.polygons, mask.shape)
        y, x = np.argwhere(back)[0]
        np.testing.assert_array_equal(back, ids == ids[y, x])
        assert back.sum() == o.area_px
