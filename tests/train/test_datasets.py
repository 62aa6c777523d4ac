"""Dataset readers, fixed leak-free splits, pixel-size resampling and deterministic augmentation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.normalise import Normaliser
from medseg.train.augment import AugmentConfig, augment, for_modality
from medseg.train.datasets import Case, SegmentationDataset, TrainSamples, folder_cases, hash_split, read_mask, resample_labels
from medseg.train.recipes import get_recipe

DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _need(name: str) -> Path:
    if not (DATA / name).is_dir():
        pytest.skip(f"real data folder {DATA / name} is absent (set MEDSEG_DATA to the shared data folder to run this test)")
    return DATA / name


def _write(path: Path, array: np.ndarray) -> None:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, array)


# --------------------------------------------------------------------------- recipes on real data
def test_psfhs_split_is_by_id_block_and_keeps_groups_apart():
    _need("psfhs")
    r = get_recipe("psfhs")
    train, val, hold = r.cases("train"), r.cases("val"), r.cases("holdout")
    assert (len(train), len(val), len(hold)) == (443, 155, 163)
    assert all("04350" <= c.id <= "04572" for c in val)
    assert all("04791" <= c.id <= "05019" for c in hold)
    assert not ({c.group for c in train} & {c.group for c in val}) and not ({c.group for c in val} & {c.group for c in hold})
    assert r.cases("test") == hold  # alias
    assert {c.source for c in val} == {"A", "B"}
    mask = read_mask(val[0], r.num_classes)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 2}


def test_polyp_and_glomeruli_splits():
    _need("polyp")
    _need("glomeruli")
    p = get_recipe("polyp")
    assert [len(p.cases(s)) for s in ("train", "val", "test")] == [1276, 174, 162]
    g = get_recipe("glomeruli")
    assert [len(g.cases(s)) for s in ("train", "val", "test", "external-test")] == [195, 7, 7, 6]
    assert all(c.id.startswith("aidpath_") and 10151 <= int(c.id.split("_")[1]) <= 10179 for c in g.cases("val"))


def test_glomeruli_tiles_are_resampled_to_the_pack_pixel_size():
    _need("glomeruli")
    g = get_recipe("glomeruli")
    cases = [c for c in g.cases("train") if c.id in ("aidpath_10003", "hubmap_ccf_x15360_y11264")]
    assert {c.mpp for c in cases} == {0.5, 0.85}
    ds = SegmentationDataset(cases, 3, 2, Normaliser.from_spec(g.normalisation), 64, target_mpp=g.mpp, cache=False)
    shapes = {c.id: ds.load(i).image.shape for i, c in enumerate(ds.cases)}
    assert shapes["aidpath_10003"] == (512, 512, 3)  # 1024 px at 0.5 µm/px -> 1.0 µm/px
    assert shapes["hubmap_ccf_x15360_y11264"] == (435, 435, 3)  # 512 px at 0.85 µm/px
    loaded = ds.load(0)
    assert set(np.unique(loaded.mask)) <= {0, 1} and loaded.mask.shape == loaded.image.shape[:2]


# --------------------------------------------------------------------------- folder datasets
def test_folder_dataset_with_binary_masks_threshold_and_hash_split(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        _write(tmp_path / "images" / f"img{i}.png", rng.integers(0, 255, (20, 24), dtype=np.uint8))
        m = np.zeros((20, 24), np.uint8)
        m[5:10, 5:12] = 255
        m[0, 0] = 100  # below the threshold: background
        _write(tmp_path / "masks" / f"img{i}.png", m)
    _write(tmp_path / "images" / "orphan.png", np.zeros((4, 4), np.uint8))  # no mask: ignored
    cases = folder_cases(tmp_path, "binary", threshold=127)
    assert [c.id for c in cases] == [f"img{i}" for i in range(6)]
    assert all(c.split == hash_split(c.id) for c in cases)
    mask = read_mask(cases[0])
    assert mask.sum() == 35 and mask[0, 0] == 0
    (tmp_path / "splits.csv").write_text("name,split\nimg0,val\nimg1,test\n")
    by_table = {c.id: c.split for c in folder_cases(tmp_path, "binary", threshold=127)}
    assert by_table["img0"] == "val" and by_table["img1"] == "test"
    r = get_recipe(str(tmp_path), classes=["background", "blob"], mask_kind="binary", threshold=127)
    assert r.in_channels == 1 and r.num_classes == 2 and r.normalisation["kind"] == "zscore"


def test_index_masks_refuse_unknown_values_and_instances_keep_ids(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[1:3, 1:3], m[5:7, 5:7] = 1, 5
    _write(tmp_path / "m.png", m)
    case = Case("m", tmp_path / "m.png", tmp_path / "m.png")
    with pytest.raises(InputError, match="class values"):
        read_mask(case, num_classes=3)
    mapped = Case("m", tmp_path / "m.png", tmp_path / "m.png", value_map=((1, 1), (5, 2)))
    assert set(np.unique(read_mask(mapped))) == {0, 1, 2}
    inst = Case("m", tmp_path / "m.png", tmp_path / "m.png", mask_kind="instance")
    assert set(np.unique(read_mask(inst))) == {0, 1}
    assert set(np.unique(read_mask(inst, keep_instances=True))) == {0, 1, 5}


def test_nearest_resampling_keeps_label_values():
    lab = np.arange(16, dtype=np.uint8).reshape(4, 4)
    up = resample_labels(lab, (8, 8))
    assert up.shape == (8, 8) and set(np.unique(up)) == set(range(16))
    assert np.array_equal(resample_labels(up, (4, 4)), lab)


# --------------------------------------------------------------------------- augmentation
def _toy():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (60, 80, 3)).astype(np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[20:40, 30:50] = 1
    mask[0:5, 0:5] = 2
    return img, mask


def test_augmentation_is_a_pure_function_of_its_seed():
    img, mask = _toy()
    cfg = for_modality("pathology")
    a = augment(img, mask, 32, cfg, np.random.default_rng(5))
    b = augment(img, mask, 32, cfg, np.random.default_rng(5))
    c = augment(img, mask, 32, cfg, np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (32, 32, 3) and a[0].dtype == np.float32 and a[1].shape == (32, 32)
    assert set(np.unique(a[1])) <= {0, 1, 2} and 0 <= a[0].min() and a[0].max() <= 255


def test_identity_augmentation_is_a_plain_crop():
    img, mask = _toy()
    out, m = augment(img, mask, (60, 80), AugmentConfig(), np.random.default_rng(0))
    assert np.array_equal(out, img.astype(np.float32)) and np.array_equal(m, mask)


def test_ultrasound_keeps_its_orientation():
    us = for_modality("ultrasound")
    assert not us.vflip and not us.hflip and not us.rot90 and us.rotate_deg <= 15
    path = for_modality("pathology")
    assert path.vflip and path.hflip and path.rot90 and path.hed > 0
    # a bright top row stays at the top of an ultrasound crop
    img = np.zeros((64, 64, 1), np.uint8)
    img[:8] = 255
    mask = np.zeros((64, 64), np.uint8)
    mask[:8] = 1
    for seed in range(10):
        _, m = augment(img, mask, 64, us, np.random.default_rng(seed))
        assert m[:4].mean() > m[-4:].mean()


def test_train_samples_are_deterministic_in_any_order():
    img, mask = _toy()
    cases = [Case(f"c{i}", Path("unused"), None) for i in range(3)]
    ds = SegmentationDataset(cases, 3, 3, Normaliser.from_spec({"kind": "zscore"}), 24, for_modality("endoscopy"))
    from medseg.train.datasets import Loaded

    for i in range(3):
        ds._cache[i] = Loaded(img, mask, (100.0, 50.0), 255.0)
    s1, s2 = TrainSamples(ds, seed=3), TrainSamples(ds, seed=3)
    forward = [s1[k][0] for k in range(7)]
    backward = [s2[k][0] for k in reversed(range(7))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward))
    epoch0 = sorted(s1.case_index(k) for k in range(3))
    assert epoch0 == [0, 1, 2]  # every case once per epoch
    x, y = s1.batch(2, 4)
    assert x.shape == (4, 3, 24, 24) and y.shape == (4, 24, 24) and y.dtype == np.int64


def test_balance_sources_gives_each_source_an_equal_share():
    from medseg.train.datasets import balance_sources

    big = [Case(f"h{i}", Path("unused"), None, source="hubmap") for i in range(20)]
    small = [Case(f"a{i}", Path("unused"), None, source="aidpath") for i in range(3)]
    out = balance_sources(big + small)
    counts = {s: sum(c.source == s for c in out) for s in ("hubmap", "aidpath")}
    assert counts == {"hubmap": 20, "aidpath": 21}  # 3 cases x round(20 / 3) = 7 repeats
    assert [c.id for c in out[:20]] == [c.id for c in big]  # the large source is kept once, in order
    assert balance_sources(big) == big  # one source: unchanged
