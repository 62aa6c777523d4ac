"""Object tables of segmentations: chunked components equal whole-image components, µm² filtering,
measurements, and slide scores against the mosaic's reference with the §10.3 rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg import metrics
from medseg.engine.wsi import SlideConfig, segment_slide
from medseg.errors import InputError
from medseg.measure.objects import KPIS_MIN_AREA_PX_20X, components, kpis_min_area_px, measure_objects, min_area_for, objects_csv, score_slide, slide_objects
from medseg.train.packs import ClassInfo
from tests.slide_fixtures import TILE_MPP, oracle_pack, write_mosaic_slide


def blobs(shape=(97, 131), seed=0, density=0.45) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return (noise > np.quantile(noise, 1 - density)).astype(np.uint8)


@pytest.mark.parametrize("chunk", [5, 16, 33, 1024])
def test_chunked_components_equal_whole_image_instances(chunk):
    mask = blobs()
    mask[10, 10] = mask[11, 11] = 1  # a diagonal-only contact
    mask[10, 11] = mask[11, 10] = 0
    ref = metrics.instances(mask)
    comp = components(mask, 1, chunk)
    assert comp.area.size == ref.max()
    assert sorted(comp.area.tolist()) == sorted(np.bincount(ref.ravel())[1:].tolist())
    for i in range(comp.area.size):  # each component's seed belongs to a reference object of the same area and box
        y, x = comp.seed[i]
        obj = ref == ref[y, x]
        assert obj.sum() == comp.area[i]
        ys, xs = np.nonzero(obj)
        assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == tuple(comp.box[i])
        assert (ys.mean(), xs.mean()) == pytest.approx((comp.sum_y[i] / comp.area[i], comp.sum_x[i] / comp.area[i]))


def test_measurements_filtering_and_table():
    labels = np.zeros((60, 80), np.uint8)
    labels[5:15, 5:15] = 1  # 100 px
    labels[30:50, 40:70] = 1  # 600 px
    labels[2:4, 70:72] = 2  # 4 px, another class
    conf = np.full(labels.shape, 255, np.uint8)
    conf[30:50, 40:70] = 128
    classes = [ClassInfo(1, "glomerulus", "#00ff00"), ClassInfo(2, "vessel", "#0000ff")]
    objs = measure_objects(labels, conf, classes, mpp=0.5, scale=(2.0, 2.0))
    assert [(o.class_name, o.area_px) for o in objs] == [("glomerulus", 100), ("glomerulus", 600), ("vessel", 4)]
    big = objs[1]
    assert big.area_um2 == pytest.approx(600 * 0.25)
    assert (big.centroid_x, big.centroid_y) == pytest.approx(((54.5 + 0.5) * 2, (39.5 + 0.5) * 2))  # slide level-0 px
    assert big.bbox == (80.0, 60.0, 140.0, 100.0)
    assert big.confidence == pytest.approx(128 / 255)
    assert big.perimeter_um == pytest.approx(big.perimeter_px * 0.5)
    assert 90 < big.perimeter_px < 100  # a 20 x 30 rectangle, pixel-centre perimeter
    kept = measure_objects(labels, conf, classes, mpp=0.5, min_area_um2=100.0)  # 100 µm² = 400 px
    assert [o.area_px for o in kept] == [600]
    with pytest.raises(InputError, match="needs the pixel size"):
        measure_objects(labels, min_area_um2=10.0)
    table = objects_csv(objs).splitlines()
    assert table[0].startswith("id,class,centroid_x,centroid_y,area_um2,area_px,perimeter_um")
    assert len(table) == 4 and table[2].startswith("2,glomerulus,110.0,80.0,150.0,600,")


def test_min_area_sources():
    pack = oracle_pack()
    assert min_area_for(pack) == 0.0
    pack.manifest = {"postprocess": {"min_object_area_um2": 2000.0}}
    assert min_area_for(pack) == 2000.0 and min_area_for(pack, 10.0) == 10.0
    assert kpis_min_area_px(None, None) == KPIS_MIN_AREA_PX_20X
    assert kpis_min_area_px(1.0, 0.5) == 5000  # a 1 µm/px grid has 4x fewer pixels than a 0.5 µm/px 20x grid


@pytest.fixture(scope="module")
def mosaic_result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mosaic")
    path, img, ref = write_mosaic_slide(folder)
    return segment_slide(path, oracle_pack(tile=128), folder / "out.zarr", SlideConfig(device="cpu", chunk=64)), ref


def test_slide_objects_match_the_reference_instances(mosaic_result):
    result, ref = mosaic_result
    objs = slide_objects(result)
    inst = metrics.instances(ref)
    assert len(objs) == inst.max() > 5
    assert sorted(o.area_px for o in objs) == sorted(np.bincount(inst.ravel())[1:].tolist())
    for o in objs:
        assert inst[int(o.centroid_y), int(o.centroid_x)] > 0 or o.area_px < 2000  # compact objects contain their centroid
        assert o.area_um2 == pytest.approx(o.area_px * TILE_MPP**2)
        assert o.confidence > 0.99
    small = min(o.area_um2 for o in objs)
    assert len(slide_objects(result, min_area_um2=small + 1)) == len(objs) - 1


def test_slide_dice_and_object_f1_against_the_reference(mosaic_result):
    result, ref = mosaic_result
    pred = result.labels[...]
    scores = score_slide(pred, ref)
    n = int(metrics.instances(ref).max())
    assert scores["dice"] == 1.0 and scores["f1"] == 1.0 and scores["tp"] == scores["n_ref"] == n
    # §10.3 step 4: the filter removes small predictions but never small true objects
    areas = np.bincount(metrics.instances(ref).ravel())[1:]
    cut = int(np.sort(areas)[2]) + 1  # removes the three smallest
    filtered = score_slide(pred, ref, min_area_px=cut)
    assert filtered["n_pred"] == n - 3 and filtered["n_ref"] == n and filtered["fn"] == 3
    assert filtered["recall"] == pytest.approx((n - 3) / n) and filtered["dice"] < 1.0
    # §10.3 step 8: no true glomeruli -> F1 = 0 whatever is predicted; Dice 1 only for an empty prediction
    empty = np.zeros_like(ref)
    assert score_slide(empty, empty)["f1"] == 0.0 and score_slide(empty, empty)["dice"] == 1.0
    assert score_slide(pred, empty)["dice"] == 0.0 and score_slide(empty, ref)["f1"] == 0.0


def test_unfinished_results_are_refused(mosaic_result, tmp_path):
    import zarr

    result, _ = mosaic_result
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(result.path, copy)
    root = zarr.open_group(str(copy), mode="r+")
    meta = dict(root.attrs["medseg"])
    meta["complete"] = False
    root.attrs["medseg"] = meta
    with pytest.raises(InputError, match="unfinished run"):
        slide_objects(copy)
    assert not math.isnan(slide_objects(result)[0].confidence)
