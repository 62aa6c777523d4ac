"""The ellipse variant of AoP (IUGC 2024 toolkit ``eval/cal_aop.py`` + ``eval/ellipse.py``; spec §9.3).

A named alternative to the evaluator's contour method (:func:`medseg.measure.biometry.aop_hsd`), in the
style of the group's earlier work (double-branch network + ellipse fitting):

1. the largest outer contour of PS and of FH, exactly as the contour method finds them;
2. each simplified by Douglas-Peucker with a tolerance of 1 px (:func:`approx_poly_dp`, a port of
   OpenCV ``approxPolyDP(contour, 1, closed=True)``);
3. when more than 5 vertices remain, a least-squares ellipse through them (:func:`fit_ellipse`, a port
   of OpenCV ``fitEllipse``, returning OpenCV's rotated-rectangle convention: width <= height, angle
   in degrees of the width axis, x right, y down);
4. the toolkit swaps width and height and turns the angle by -90 deg, so the PS "axis" is the fitted
   major axis; its end on the + side of that direction is the vertex V, the other end E (the toolkit
   converts degrees with the constant 0.01745 here, and with 2 pi / 360 for the head; both kept);
5. V is moved into the FH ellipse's own frame (a = half the swapped first size, b = half the second);
   the tangent slope is (x0 y0 - sqrt(b^2 x0^2 + a^2 y0^2 - a^2 b^2)) / (x0^2 - a^2), x0 nudged by 1
   when the denominator is exactly 0; the touching point is mapped back;
6. AoP by the law of cosines at V between E and the touching point.

Which root and which PS end are used follow OpenCV's angle convention, not a "head on one side" rule,
so on some masks this angle is not the contour method's one. Deviations from the released code, all
of them where that code fails or gives a meaningless number: no result but a status when a structure
is missing or has 5 or fewer vertices after simplification (the code silently returns nothing), and
when V lies inside the fitted head ellipse (the code sets the slope to 0 and reports an angle to a
point that is not on the head). The cosine is clamped to [-1, 1] against float round-off.

HSD is not part of the toolkit's ellipse code; here it is the distance from this method's vertex to
the nearest point of the FH contour (the contour method's step 6 with this vertex), in pixels, and in
mm when a pixel size is given. Points are (row, col) floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medseg.measure.biometry import Biometry, largest_contour

FLT_EPSILON = float(np.finfo(np.float32).eps)
DEG_PS = 0.01745  # the toolkit's degrees -> radians constant for the symphysis ellipse
MIN_VERTICES = 6  # the toolkit fits an ellipse only when more than 5 vertices remain


@dataclass(frozen=True)
class Ellipse:
    """A fitted ellipse in OpenCV's rotated-rectangle convention (x = column, y = row, y down).

    ``width`` <= ``height`` are full axis lengths; the width axis points along ``angle`` degrees
    (cos, sin) in (x, y), the height axis perpendicular to it.
    """

    cx: float
    cy: float
    width: float
    height: float
    angle: float

    def outline(self, n: int = 72) -> np.ndarray:
        """``(n, 2)`` points (row, col) on the ellipse, for drawing."""
        t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
        th = math.radians(self.angle)
        u = 0.5 * self.width * np.cos(t)
        v = 0.5 * self.height * np.sin(t)
        x = self.cx + u * math.cos(th) - v * math.sin(th)
        y = self.cy + u * math.sin(th) + v * math.cos(th)
        return np.stack([y, x], axis=1)


@dataclass(frozen=True)
class EllipseBiometry(Biometry):
    """A :class:`Biometry` from the ellipse method, with the two fitted ellipses (None where not fitted)."""

    method: str = "ellipse"
    ps_ellipse: Ellipse | None = None
    fh_ellipse: Ellipse | None = None


# --------------------------------------------------------------------------- OpenCV ports
def approx_poly_dp(points: np.ndarray, epsilon: float, closed: bool = True) -> np.ndarray:
    """Douglas-Peucker simplification of a polyline, as OpenCV ``approxPolyDP`` (same vertices, same order).

    ``points`` is ``(n, 2)`` (x, y); the result holds a subset of them. For a closed curve the
    recursion starts from an approximately farthest pair of points (three passes from point 0), and a
    final pass drops vertices that lie on an almost straight run.
    """
    src = [(float(p[0]), float(p[1])) for p in np.asarray(points)]
    count = len(src)
    if count == 0:
        return np.zeros((0, 2))
    eps = float(epsilon) ** 2
    stack: list[tuple[int, int]] = []
    dst: list[tuple[float, float]] = []
    is_closed = bool(closed)
    init_iters = 3
    slice_ = (0, 0)
    if not is_closed:
        if src[count - 1] != src[0]:
            stack.append((0, count - 1))
        else:
            is_closed, init_iters = True, 1
    if is_closed:
        pos = 0
        right_start = 0
        start_pt = src[0]
        le_eps = False
        for _ in range(init_iters):
            max_dist = 0.0
            pos = (pos + right_start) % count
            start_pt = src[pos]
            pos = (pos + 1) % count
            for j in range(1, count):
                pt = src[pos]
                pos = (pos + 1) % count
                dx, dy = pt[0] - start_pt[0], pt[1] - start_pt[1]
                dist = dx * dx + dy * dy
                if dist > max_dist:
                    max_dist, right_start = dist, j
            le_eps = max_dist <= eps
        if not le_eps:
            s = pos % count
            e = (right_start + s) % count
            stack.append((e, s))  # right_slice
            stack.append((s, e))  # slice
        else:
            dst.append(start_pt)
    while stack:
        slice_ = stack.pop()
        end_pt = src[slice_[1]]
        pos = slice_[0]
        start_pt = src[pos]
        pos = (pos + 1) % count
        right_start = 0
        if pos != slice_[1]:
            dx, dy = end_pt[0] - start_pt[0], end_pt[1] - start_pt[1]
            max_dist = 0.0
            while pos != slice_[1]:
                pt = src[pos]
                pos = (pos + 1) % count
                dist = abs((pt[1] - start_pt[1]) * dx - (pt[0] - start_pt[0]) * dy)
                if dist > max_dist:
                    max_dist, right_start = dist, (pos + count - 1) % count
            le_eps = max_dist * max_dist <= eps * (dx * dx + dy * dy)
        else:
            le_eps = True
            start_pt = src[slice_[0]]
        if le_eps:
            dst.append(start_pt)
        else:
            stack.append((right_start, slice_[1]))
            stack.append((slice_[0], right_start))
    if not is_closed:
        dst.append(src[count - 1])
    return np.asarray(_cleanup(dst, bool(closed), eps))


def _cleanup(dst: list[tuple[float, float]], closed: bool, eps: float) -> list[tuple[float, float]]:
    """OpenCV's last stage: remove extra points on almost straight lines (in place, circular buffer)."""
    count = new_count = len(dst)
    if count == 0:
        return dst
    dst = list(dst)
    pos = count - 1 if closed else 0
    start_pt = dst[pos]
    pos = (pos + 1) % count
    wpos = pos
    pt = dst[pos]
    pos = (pos + 1) % count
    i = 0 if closed else 1
    while i < count - (0 if closed else 1) and new_count > 2:
        end_pt = dst[pos]
        pos = (pos + 1) % count
        dx, dy = end_pt[0] - start_pt[0], end_pt[1] - start_pt[1]
        dist = abs((pt[0] - start_pt[0]) * dy - (pt[1] - start_pt[1]) * dx)
        inner = (pt[0] - start_pt[0]) * (end_pt[0] - pt[0]) + (pt[1] - start_pt[1]) * (end_pt[1] - pt[1])
        if dist * dist <= 0.5 * eps * (dx * dx + dy * dy) and dx != 0 and dy != 0 and inner >= 0:
            new_count -= 1
            dst[wpos] = start_pt = end_pt
            wpos = (wpos + 1) % count
            pt = dst[pos]
            pos = (pos + 1) % count
            i += 2
            continue
        dst[wpos] = start_pt = pt
        wpos = (wpos + 1) % count
        pt = end_pt
        i += 1
    if not closed:
        dst[wpos] = pt
    return dst[:new_count]


def fit_ellipse(points: np.ndarray) -> Ellipse:
    """Least-squares ellipse through ``(n >= 6, 2)`` points (x, y), as OpenCV ``fitEllipse`` (``fitEllipseNoDirect``).

    A general conic is fitted on centred, scaled points; its centre is solved from the gradient
    equations; the quadratic part is refitted about that centre; axes and angle follow. Returned in
    float32 precision like OpenCV's ``RotatedRect``.
    """
    pts = np.asarray(points, dtype=np.float32)
    n = len(pts)
    if n < 5:
        raise ValueError(f"an ellipse needs at least 5 points, not {n}")
    c = pts.sum(axis=0, dtype=np.float32) / np.float32(n)  # float32 like OpenCV's Point2f centroid
    p = (pts - c).astype(np.float64)
    c = c.astype(np.float64)
    s = float(np.abs(p).sum())
    scale = 100.0 / (s if s > FLT_EPSILON else FLT_EPSILON)
    design = _conic_design(p * scale)
    w = np.linalg.svd(design, compute_uv=False)
    if w[0] * FLT_EPSILON > w[-1]:  # degenerate (e.g. collinear): OpenCV jitters the points slightly
        jitter = np.random.default_rng(0).uniform(-1, 1, p.shape) * (s / (n * 2) * 1e-3)
        p = p + jitter
        design = _conic_design(p * scale)
    gfp = np.linalg.lstsq(design, np.full(n, 10000.0), rcond=None)[0]
    centre = np.linalg.lstsq(np.array([[2 * gfp[0], gfp[2]], [gfp[2], 2 * gfp[1]]]), gfp[3:5], rcond=None)[0]
    q = p * scale - centre
    quad = np.linalg.lstsq(np.stack([q[:, 0] ** 2, q[:, 1] ** 2, q[:, 0] * q[:, 1]], axis=1), np.ones(n), rcond=None)[0]
    rp4 = -0.5 * math.atan2(quad[2], quad[1] - quad[0])
    t = quad[2] / math.sin(-2.0 * rp4) if abs(quad[2]) > 1e-8 else quad[1] - quad[0]
    r2 = abs(quad[0] + quad[1] - t)
    r2 = math.sqrt(2.0 / r2) if r2 > 1e-8 else r2
    r3 = abs(quad[0] + quad[1] + t)
    r3 = math.sqrt(2.0 / r3) if r3 > 1e-8 else r3
    cx, cy = centre[0] / scale + c[0], centre[1] / scale + c[1]
    width, height, angle = r2 * 2 / scale, r3 * 2 / scale, 0.0
    if width > height:
        width, height = height, width
        angle = 90 + rp4 * 180 / math.pi
    if angle < -180:
        angle += 360
    if angle > 360:
        angle -= 360
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    return Ellipse(f32(cx), f32(cy), f32(width), f32(height), f32(angle))


def _conic_design(p: np.ndarray) -> np.ndarray:
    px, py = p[:, 0], p[:, 1]
    return np.stack([-px * px, -py * py, -px * py, px, py], axis=1)


# --------------------------------------------------------------------------- the measurement
def _rc(x: float, y: float) -> tuple[float, float]:
    return (float(y), float(x))


def aop_hsd_ellipse(labels: np.ndarray, spacing: Sequence[float] | None = None, ps_value: int = 1, fh_value: int = 2) -> EllipseBiometry:
    """AoP (degrees) by the ellipse variant and HSD from its vertex; never raises for an unmeasurable mask."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"aop_hsd_ellipse takes a 2-D label map, not shape {labels.shape}")
    ps = largest_contour(labels == ps_value)
    if ps is None:
        return EllipseBiometry("no_symphysis")
    fh = largest_contour(labels == fh_value)
    if fh is None:
        return EllipseBiometry("no_head")
    ps_poly = approx_poly_dp(ps[:, ::-1], 1.0, closed=True)
    fh_poly = approx_poly_dp(fh[:, ::-1], 1.0, closed=True)
    if len(ps_poly) < MIN_VERTICES:
        return EllipseBiometry("symphysis_not_fitted")
    if len(fh_poly) < MIN_VERTICES:
        return EllipseBiometry("head_not_fitted")
    ps_e, fh_e = fit_ellipse(ps_poly), fit_ellipse(fh_poly)
    if not all(math.isfinite(v) and v > 0 for v in (ps_e.width, ps_e.height, fh_e.width, fh_e.height)):
        return EllipseBiometry("ellipse_fit_failed", ps_ellipse=ps_e, fh_ellipse=fh_e)

    # the symphysis axis: swapped sizes, angle - 90 deg, the toolkit's 0.01745 rad per degree
    half = ps_e.height / 2
    ang = (ps_e.angle - 90) * DEG_PS
    e_x, e_y = ps_e.cx - half * math.cos(ang), ps_e.cy - half * math.sin(ang)
    v_x, v_y = ps_e.cx + half * math.cos(ang), ps_e.cy + half * math.sin(ang)
    vertex, other = _rc(v_x, v_y), _rc(e_x, e_y)

    d = ((fh - np.array([v_y, v_x])) ** 2).sum(axis=1)
    k = int(np.argmin(d))
    hsd = math.sqrt(float(d[k]))
    hsd_point = (int(fh[k, 0]), int(fh[k, 1]))
    hsd_mm = None
    if spacing is not None:
        hsd_mm = math.hypot((fh[k, 0] - v_y) * float(spacing[0]), (fh[k, 1] - v_x) * float(spacing[1]))
    a_len = math.hypot(v_x - e_x, v_y - e_y)
    common = dict(hsd=hsd, hsd_mm=hsd_mm, ps_points=(other, vertex), vertex=vertex, other_end=other, hsd_point=hsd_point,
                  ps_length=a_len, ps_ellipse=ps_e, fh_ellipse=fh_e)

    # the tangent from V to the head ellipse, in the head ellipse's frame
    a, b = fh_e.height / 2, fh_e.width / 2
    theta = 2 * math.pi * (fh_e.angle - 90) / 360
    dx, dy = v_x - fh_e.cx, v_y - fh_e.cy
    x0 = math.cos(theta) * dx + math.sin(theta) * dy
    y0 = -math.sin(theta) * dx + math.cos(theta) * dy
    if x0**2 - a**2 == 0:
        x0 += 1
    disc = b**2 * x0**2 + a**2 * y0**2 - a**2 * b**2
    if disc < 0:
        return EllipseBiometry("vertex_inside_head", **common)
    slope = (x0 * y0 - math.sqrt(disc)) / (x0**2 - a**2)
    bias = y0 - slope * x0
    tx = (-2 * slope * bias / b**2) / (2 * (1 / a**2 + slope**2 / b**2))
    ty = tx * slope + bias
    t_x = math.cos(theta) * tx - math.sin(theta) * ty + fh_e.cx
    t_y = math.sin(theta) * tx + math.cos(theta) * ty + fh_e.cy

    b_len = math.hypot(v_x - t_x, v_y - t_y)
    c_len = math.hypot(e_x - t_x, e_y - t_y)
    if a_len == 0 or b_len == 0:
        return EllipseBiometry("ellipse_fit_failed", **common)
    cosine = (a_len**2 + b_len**2 - c_len**2) / (2 * a_len * b_len)
    aop = math.degrees(math.acos(min(1.0, max(-1.0, cosine))))
    return EllipseBiometry("ok", aop=aop, tangent=_rc(t_x, t_y), **common)


__all__ = ["Ellipse", "EllipseBiometry", "aop_hsd_ellipse", "approx_poly_dp", "fit_ellipse"]
