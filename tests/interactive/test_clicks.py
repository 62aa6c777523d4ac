"""Clicks: parsing, refusals, disk encoding and the standard click simulation."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import InputError, UsageError
from scipy import ndimage

from medseg.interactive.clicks import Click, _border_distance, check_clicks, check_image, encode, interior_point, next_click, parse_points, random_inside


def test_points_parse_in_order_with_signs():
    clicks = parse_points("10,20,+; 30.5,4,-;7,8")
    assert clicks == [Click(10, 20, True), Click(30.5, 4, False), Click(7, 8, True)]
    for bad in ("10;20", "a,b,+", "1,2,*", " ; "):
        with pytest.raises(UsageError, match="x,y"):
            parse_points(bad)


def test_clicks_outside_the_image_and_empty_images_are_refused():
    check_clicks([Click(0, 0), Click(49, 29)], (30, 50))
    with pytest.raises(InputError, match=r"outside the image \(50 x 30 pixels\)"):
        check_clicks([Click(50, 3)], (30, 50))
    with pytest.raises(InputError, match="outside the image"):
        check_clicks([Click(-1, 3)], (30, 50))
    with pytest.raises(InputError, match="empty"):
        check_image(np.full((20, 20), 7, np.uint8))


def test_encoding_puts_disks_on_the_right_channels():
    prev = np.zeros((40, 40), bool)
    prev[:5] = True
    g = encode([Click(10, 20, True), Click(30, 5, False)], prev, (40, 40), radius=3)
    assert g.shape == (3, 40, 40) and g.dtype == np.float32
    assert g[0, 20, 10] == 1 and g[0, 20, 14] == 0 and g[0, 20, 13] == 1 and g[0, 5, 30] == 0
    assert g[1, 5, 30] == 1 and g[1, 20, 10] == 0
    assert g[2].sum() == prev.sum()


def test_simulated_clicks_go_to_the_centre_of_the_largest_error():
    target = np.zeros((60, 60), bool)
    target[10:50, 10:30] = True  # 40 x 20 object
    first = next_click(target, np.zeros_like(target))
    assert first.positive and 27 <= first.y <= 32 and 18 <= first.x <= 21
    pred = target.copy()
    pred[10:50, 30:45] = True  # a false-positive band larger than anything missed
    pred[10:14, 10:14] = False
    second = next_click(target, pred)
    assert not second.positive and 30 <= second.x <= 44
    assert next_click(target, target) is None


def test_random_first_clicks_lie_far_inside_the_object():
    target = np.zeros((50, 50), bool)
    target[5:45, 5:45] = True
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = random_inside(target, rng)
        assert c.positive and 14 <= c.x <= 35 and 14 <= c.y <= 35


def test_border_distance_on_the_bounding_box_equals_the_whole_image_transform():
    """The click simulation measures distances on a region's box only; the values must be the whole image's,
    for regions inside the image and touching its edges alike."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(5, 90, 2))
        region = ndimage.binary_opening(rng.random((h, w)) < rng.uniform(0.4, 0.9), iterations=int(rng.integers(0, 3)))
        if trial % 4 == 0:  # a block against the bottom-left corner
            region = np.zeros((h, w), bool)
            region[int(rng.integers(0, h)) :, : int(rng.integers(1, w + 1))] = True
        if not region.any():
            continue
        whole = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        box, r0, c0 = _border_distance(region)
        rows, cols = np.nonzero(region)
        assert r0 == rows.min() and c0 == cols.min()
        np.testing.assert_array_equal(box, whole[r0 : r0 + box.shape[0], c0 : c0 + box.shape[1]])
        assert np.count_nonzero(whole) == np.count_nonzero(box)  # nothing non-zero outside the box
        r, c, d = interior_point(region)
        assert region[r, c] and d == whole.max()


def test_encoding_into_a_given_array_matches_a_fresh_one():
    clicks = [Click(3, 4, True), Click(20, 9, False), Click(39, 39, True)]
    prev = np.eye(40, dtype=bool)
    out = np.full((3, 40, 40), 9.0, np.float32)  # stale values must not survive
    encode(clicks, prev, (40, 40), 3, out=out)
    np.testing.assert_array_equal(out, encode(clicks, prev, (40, 40), 3))
    encode(clicks, None, (40, 40), 3, out=out)
    assert out[2].sum() == 0
