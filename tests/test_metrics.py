"""Every metric against cases computed by hand, including empty prediction and empty reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg import metrics as M


def _mask(shape, *boxes):
    m = np.zeros(shape, bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


def test_dice_and_iou_by_hand():
    p = _mask((4, 4), (0, 2, 0, 2))  # 4 px
    g = _mask((4, 4), (0, 2, 0, 3))  # 6 px, overlap 4
    assert M.dice(p, g) == pytest.approx(8 / 10)
    assert M.iou(p, g) == pytest.approx(4 / 6)
    assert M.dice(p, g, smooth=1) == pytest.approx(9 / 11)  # IUGC variant


def test_both_empty_is_perfect():
    z = np.zeros((5, 5), bool)
    assert M.binary_metrics(z, z) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}
    assert M.hausdorff(z, z, 100) == 0.0


@pytest.mark.parametrize("empty", ["prediction", "reference"])
def test_one_empty_gives_zero_overlap_and_undefined_distances(empty):
    full = _mask((6, 6), (1, 3, 1, 3))
    z = np.zeros_like(full)
    p, g = (z, full) if empty == "prediction" else (full, z)
    out = M.binary_metrics(p, g)
    assert out["dice"] == 0.0 and out["iou"] == 0.0
    assert math.isnan(out["hd95"]) and math.isnan(out["asd"])
    penalised = M.binary_metrics(p, g, empty_distance=100.0)
    assert penalised["hd95"] == 100.0 and penalised["asd"] == 100.0


def test_single_pixels_distance():
    p = _mask((5, 5), (0, 1, 0, 1))
    g = _mask((5, 5), (3, 4, 4, 5))
    assert M.hd95(p, g) == pytest.approx(5.0)
    assert M.hausdorff(p, g, 100) == pytest.approx(5.0)
    assert M.asd(p, g) == pytest.approx(5.0)
    assert M.hd95(p, g, spacing=(2.0, 1.0)) == pytest.approx(math.sqrt(6**2 + 4**2))


def test_shifted_squares_by_hand():
    # 3x3 squares one column apart: boundaries are the 8 outer pixels (the centre has 4 foreground neighbours).
    p = _mask((5, 6), (1, 4, 1, 4))
    g = _mask((5, 6), (1, 4, 2, 5))
    assert M.boundary(p).sum() == 8
    d_pg, d_gp = M.surface_distances(p, g)
    assert sorted(d_pg) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sorted(d_gp) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert M.asd(p, g) == pytest.approx(8 / 16)
    assert M.hd95(p, g) == pytest.approx(1.0)
    assert M.dice(p, g) == pytest.approx(2 * 6 / 18)
    assert M.iou(p, g) == pytest.approx(6 / 12)


def test_boundary_counts_the_image_edge_as_background():
    full = np.ones((3, 3), bool)
    assert M.boundary(full).sum() == 8


def test_class_metrics_per_class_and_group():
    ref = np.zeros((6, 6), np.uint8)
    ref[0:2, 0:2] = 1
    ref[3:6, 3:6] = 2
    pred = ref.copy()
    pred[3:6, 3:6] = 0  # class 2 missed entirely
    out = M.class_metrics(pred, ref, {1: "ps", 2: "fh"}, groups={"all": [1, 2]})
    assert out["ps"]["dice"] == 1.0 and out["ps"]["hd95"] == 0.0
    assert out["fh"]["dice"] == 0.0 and math.isnan(out["fh"]["asd"])
    assert out["all"]["dice"] == pytest.approx(2 * 4 / (4 + 13))


def test_object_f1_by_hand():
    ref = _mask((20, 20), (0, 4, 0, 4), (10, 14, 10, 14))
    pred = _mask((20, 20), (0, 4, 0, 3), (16, 20, 0, 4))  # IoU 12/16 with the first; a false positive; second missed
    s = M.object_f1(pred, ref)
    assert (s.tp, s.fp, s.fn, s.n_pred, s.n_ref) == (1, 1, 1, 2, 2)
    assert s.precision == 0.5 and s.recall == 0.5 and s.f1 == 0.5


def test_object_iou_threshold_is_inclusive():
    ref = _mask((8, 8), (0, 2, 0, 4))
    pred = _mask((8, 8), (0, 2, 0, 2))  # IoU exactly 0.5
    assert M.object_f1(pred, ref).f1 == 1.0
    pred2 = _mask((8, 8), (0, 2, 0, 2), (0, 1, 2, 3))  # still one object, IoU 5/8
    assert M.object_f1(pred2, ref).tp == 1


def test_object_f1_empty_cases_follow_kpis():
    z = np.zeros((10, 10), bool)
    blob = _mask((10, 10), (2, 5, 2, 5))
    nothing = M.object_f1(z, z)  # no reference object: F1 is 0 even for an empty prediction (KPIs rule)
    assert (nothing.precision, nothing.recall, nothing.f1) == (0.0, 0.0, 0.0)
    assert M.object_f1(blob, z).f1 == 0.0 and M.object_f1(blob, z).fp == 1
    missed = M.object_f1(z, blob)
    assert missed.f1 == 0.0 and missed.fn == 1 and missed.recall == 0.0


def test_objects_are_8_connected_and_small_ones_can_be_dropped():
    ref = _mask((10, 10), (0, 3, 0, 3))
    diag = np.zeros((10, 10), bool)
    diag[0:3, 0:3] = True
    diag[3, 3] = True  # touches diagonally: same object
    assert M.instances(diag).max() == 1
    pred = ref.copy()
    pred[8, 8] = True  # a 1-pixel speck
    assert M.object_f1(pred, ref).fp == 1
    assert M.object_f1(pred, ref, min_area=2).fp == 0


def test_instance_images_keep_touching_objects_apart():
    ref = np.zeros((4, 8), np.uint16)
    ref[:, 0:4], ref[:, 4:8] = 1, 2
    pred = ref.copy()
    s = M.object_f1(pred, ref, instances_given=True)
    assert (s.tp, s.n_ref) == (2, 2)
    merged = M.object_f1(pred > 0, ref, instances_given=False)  # as components they merge into one
    assert merged.n_pred == 1


def test_match_iou_is_sparse():
    a = np.zeros((6, 6), int)
    b = np.zeros((6, 6), int)
    a[0:2, 0:2], a[4:6, 4:6] = 1, 2
    b[0:2, 0:3] = 7
    pi, ri, ious = M.match_iou(a, b)
    assert list(pi) == [0] and list(ri) == [0] and ious[0] == pytest.approx(4 / 6)


def test_summaries_skip_undefined_values():
    s = M.summarise([1.0, float("nan"), 3.0])
    assert s["mean"] == 2.0 and s["n"] == 2 and s["n_undefined"] == 1
    cases = [{"ps": {"dice": 1.0, "hd95": 0.0}}, {"ps": {"dice": 0.0, "hd95": float("nan")}}]
    out = M.summarise_cases(cases, ("dice", "hd95"))
    assert out["ps"]["dice"]["mean"] == 0.5 and out["ps"]["hd95"]["n_undefined"] == 1
    objs = M.summarise_objects([M.object_f1(_mask((4, 4), (0, 2, 0, 2)), _mask((4, 4), (0, 2, 0, 2)))])
    assert objs["f1"]["mean"] == 1.0 and objs["tp"] == 1


def test_shape_mismatch_is_an_error():
    from medseg.errors import InputError

    with pytest.raises(InputError):
        M.dice(np.zeros((2, 2)), np.zeros((3, 3)))
