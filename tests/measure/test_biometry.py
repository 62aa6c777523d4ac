"""AoP/HSD by the IUGC contour rules (spec §9.3): synthetic shapes with known answers, the PSFHS
reference table, and unmeasurable masks that give a status instead of an exception."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest

from medseg.measure.biometry import aop_hsd, biometry_errors, outer_contours

DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _angle(u, v) -> float:
    u, v = np.asarray(u, float), np.asarray(v, float)
    return math.degrees(math.acos(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))))


def _scene(shape=(512, 512)):
    """A rotated rectangle (symphysis) with integer corners and a disc (head) below-right of it.

    Rectangle: from P0 along u = (3, 4)/5 (row, col) for 150 px, 10 px wide along n = (-4, 3)/5, so
    its corners P0, P0+(90,120), P0+(-8,6), P0+(82,126) are pixel centres. Its two diagonals tie; the
    rule keeps the first pair in contour order, i.e. the one through the raster-first (top) corner:
    E = P0+(-8,6), V = P0+(90,120). Head: disc of radius 90 centred at V+(120,90) (distance 150).
    """
    rows, cols = np.indices(shape)
    p0 = np.array([40, 20])
    along = ((rows - p0[0]) * 3 + (cols - p0[1]) * 4) / 5.0
    across = (-(rows - p0[0]) * 4 + (cols - p0[1]) * 3) / 5.0
    labels = np.zeros(shape, np.uint8)
    eps = 1e-9
    labels[(along >= -eps) & (along <= 150 + eps) & (across >= -eps) & (across <= 10 + eps)] = 1
    v, e = p0 + (90, 120), p0 + (-8, 6)
    c = v + (120, 90)
    labels[(rows - c[0]) ** 2 + (cols - c[1]) ** 2 <= 90**2] = 2
    return labels, v, e, c


def test_synthetic_rectangle_and_disc_match_the_analytic_values():
    labels, v, e, c = _scene()
    b = aop_hsd(labels)
    assert b.ok, b.reason
    assert b.vertex == tuple(v) and b.other_end == tuple(e)
    assert b.hsd == pytest.approx(60.0, abs=0.5)  # |VC| - R, reached at the pixel V + (48, 36)
    # Tangent from V to the circle, on the side that keeps the head on its left: direction (0.28, 0.96).
    expected_aop = _angle(e - v, (0.28, 0.96))
    assert b.aop == pytest.approx(expected_aop, abs=0.5)
    assert b.tangent is not None and math.dist(b.tangent, v + 120 * np.array([0.28, 0.96])) < 3
    assert b.hsd_mm == None  # noqa: E711 - no spacing given
    assert aop_hsd(labels, spacing=(0.2, 0.2)).hsd_mm == pytest.approx(0.2 * b.hsd)


def test_unmeasurable_masks_give_a_status_not_an_exception():
    labels, v, _, _ = _scene()
    assert aop_hsd(np.where(labels == 1, 0, labels)).status == "no_symphysis"
    assert aop_hsd(np.where(labels == 2, 0, labels)).status == "no_head"
    tiny = np.zeros((32, 32), np.uint8)
    tiny[3, 3], tiny[20:25, 20:25] = 1, 2
    assert aop_hsd(tiny).status == "symphysis_too_small"
    level = labels.copy()
    level[level == 2] = 0
    level[v[0] - 5 : v[0] + 20, v[1] + 30 : v[1] + 60] = 2  # head level with the vertex, to its right
    b = aop_hsd(level)
    assert b.status == "no_tangent" and not b.ok and b.aop is None and b.hsd is not None
    assert "tangent" in b.reason
    noise = np.random.default_rng(0).integers(0, 3, (64, 64)).astype(np.uint8)
    assert aop_hsd(noise).status in {"ok", "no_tangent"}
    assert biometry_errors(b, aop_hsd(labels)) == {"aop_error": None, "hsd_error": None}


def test_outer_contours_follow_opencv_conventions():
    square = np.zeros((4, 4), np.uint8)
    square[1:3, 1:3] = 1
    assert outer_contours(square)[0].tolist() == [[1, 1], [2, 1], [2, 2], [1, 2]]
    ring = np.zeros((7, 10), np.uint8)
    ring[1:6, 1:6] = 1
    ring[2:5, 2:5] = 0
    ring[3, 3] = 1  # inside the hole: not an external contour
    ring[0, 8] = 1  # found first in raster order, listed last (as OpenCV does)
    contours = outer_contours(ring)
    assert len(contours) == 2 and contours[1].tolist() == [[0, 8]]
    assert len(contours[0]) == 16 and contours[0][0].tolist() == [1, 1]
    assert outer_contours(np.zeros((3, 3))) == []


def test_reference_table_is_reproduced():
    folder = DATA / "psfhs"
    if not (folder / "biometry_reference.csv").is_file():
        pytest.skip(f"real data folder {folder} is absent (set MEDSEG_DATA to the shared data folder to run this test)")
    import imageio.v3 as iio

    with open(folder / "biometry_reference.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen = [r for i, r in enumerate(rows) if r["status"] != "ok" or i % 8 == 0]
    assert sum(r["status"] == "no_tangent" for r in chosen) == 17
    for r in chosen:
        b = aop_hsd(iio.imread(folder / "labels" / f"{r['id']}.png"))
        assert b.status == r["status"], r["id"]
        if b.ok:
            assert b.aop == pytest.approx(float(r["aop_deg"]), abs=1e-3), r["id"]
            assert b.hsd == pytest.approx(float(r["hsd_px"]), abs=1e-3), r["id"]
            assert " ".join(map(str, b.vertex)) == r["ps_ref_rc"] and " ".join(map(str, b.tangent)) == r["tangent_rc"], r["id"]
            # spec §9.3 step 7: on PSFHS ground truth the AoP is the largest angle between V->E and V->q over the head contour
            v, e = np.array(b.vertex), np.array(b.other_end)
            head = max(outer_contours(iio.imread(folder / "labels" / f"{r['id']}.png") == 2), key=len)
            u, w = (e - v).astype(float), (head - v).astype(float)
            cos = (w @ u) / (np.linalg.norm(w, axis=1) * np.linalg.norm(u))
            assert b.aop == pytest.approx(math.degrees(math.acos(cos.min())), abs=1e-6), r["id"]
