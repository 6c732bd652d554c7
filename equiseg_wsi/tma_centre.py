"""Where the punch of a TMA core is when its tissue does not fill it: the last step of dearraying.

A punched core is a disc, but the tissue in it may not be: a half-moon, a core with a segment cut off by the
section's edge, or sparse patches. Their tissue centroid lies 10-25% of a diameter off the punch. What stays
true is that the tissue's outer rim is an arc of the punch circle: the convex hull of the tissue follows that
arc in many short steps and crosses the missing part in a few long ones (a half-moon's chord, the cut edge, the
gaps between patches). So the punch is the circle fitted to the short-step part of the hull:

* with its own radius when the arc covers at least half the circle and the radius is plausible (0.8-1.25 x the
  grid's punch radius); otherwise with the grid's radius, started from the fitted grid node;
* a fit that drifts more than half a spacing from the grid node, or leaves tissue outside, is not trusted and
  the grid node is used (the position the arrayer punched).

Whole cores keep their tissue centroid (it agrees with the fit within `AGREE` of a diameter): nothing changes
for them. Everything here is in mask px, points as (x, y) = (column, row) with pixel corners on integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["AGREE", "PunchFit", "fit_punch", "rim_points"]

#: Hull edges longer than this share of the diameter cross missing tissue: they are not on the punch's rim.
MAX_RIM_STEP = 0.25
#: Centroid and fitted punch closer than this share of the diameter: the core is whole, keep the centroid.
AGREE = 0.03
#: A fit with its own radius needs the rim to cover at least this many degrees of the circle.
MIN_ARC_DEG = 180.0
#: Fitted radius accepted within this range of the grid's punch radius.
RADIUS_RANGE = (0.8, 1.25)
#: Share of the core's tissue that must lie inside the fitted circle (radius x 1.06) for the fit to count.
MIN_INSIDE = 0.97

#: A core with at least this share of the punch's area in tissue is whole when no fit can be trusted.
WHOLE_AREA = 0.8

_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class PunchFit:
    """The punch of one core: centre (x, y) and radius in mask px; `partial` when the centroid was not used."""

    x: float
    y: float
    radius: float
    partial: bool
    how: str  # "centroid", "arc" (own radius), "grid radius" or "grid node"


def rim_points(crop: np.ndarray, origin: tuple[int, int], diameter: float) -> np.ndarray:
    """Points every ~1 px along the short edges of the convex hull of `crop`'s tissue, as (x, y) mask px.

    `origin` is the (row, col) of crop[0, 0]; pixel corners are used, so a disc's hull is the disc itself.
    """
    edge = crop & ~ndimage.binary_erosion(crop, structure=_CROSS, border_value=0)
    rows, cols = np.nonzero(edge)
    if rows.size < 3:
        return np.zeros((0, 2))
    corners = np.concatenate([np.stack([cols + dx, rows + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    corners = np.unique(corners, axis=0).astype(np.float64) + (origin[1], origin[0])
    from scipy.spatial import ConvexHull, QhullError  # here: only TMA slides need it (0.2 s of start-up)

    try:
        hull = corners[ConvexHull(corners).vertices]
    except QhullError:
        return np.zeros((0, 2))
    nxt = np.roll(hull, -1, axis=0)
    out = []
    for a, b in zip(hull, nxt, strict=True):
        length = float(np.hypot(*(b - a)))
        if length > MAX_RIM_STEP * diameter:
            continue
        n = max(1, int(math.ceil(length)))
        t = np.arange(n)[:, None] / n
        out.append(a + t * (b - a))
    return np.concatenate(out) if out else np.zeros((0, 2))


def _arc_deg(points: np.ndarray, cx: float, cy: float) -> float:
    """Degrees of the circle around (cx, cy) that the points cover (360 minus the largest empty gap)."""
    ang = np.sort(np.arctan2(points[:, 1] - cy, points[:, 0] - cx))
    gaps = np.diff(np.concatenate([ang, ang[:1] + 2 * np.pi]))
    return float(360.0 - math.degrees(float(gaps.max())))


def _fit_circle(points: np.ndarray, start: tuple[float, float], radius: float | None) -> tuple[float, float, float]:
    """Geometric least-squares circle through the points (radius fixed when given), robust to a few outliers."""
    from scipy import optimize  # here: only TMA slides need it (0.2 s of start-up)

    if radius is None:
        def res(v: np.ndarray) -> np.ndarray:
            out: np.ndarray = np.hypot(points[:, 0] - v[0], points[:, 1] - v[1]) - v[2]
            return out

        r0 = float(np.median(np.hypot(points[:, 0] - start[0], points[:, 1] - start[1])))
        sol = optimize.least_squares(res, [start[0], start[1], r0], loss="soft_l1", f_scale=1.0)
        return float(sol.x[0]), float(sol.x[1]), float(sol.x[2])

    def res_fixed(v: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.hypot(points[:, 0] - v[0], points[:, 1] - v[1]) - radius
        return out

    sol = optimize.least_squares(res_fixed, [start[0], start[1]], loss="soft_l1", f_scale=1.0)
    return float(sol.x[0]), float(sol.x[1]), float(radius)


def _inside_share(crop: np.ndarray, origin: tuple[int, int], cx: float, cy: float, radius: float) -> float:
    rows, cols = np.nonzero(crop)
    if rows.size == 0:
        return 0.0
    d = np.hypot(cols + origin[1] + 0.5 - cx, rows + origin[0] + 0.5 - cy)
    return float((d <= radius * 1.06 + 0.5).mean())


def fit_punch(
    crop: np.ndarray,
    origin: tuple[int, int],
    centroid: tuple[float, float],
    node: tuple[float, float],
    radius: float,
    spacing: float,
) -> PunchFit:
    """The punch circle of one core's tissue `crop` (bool, top-left at `origin` = (row, col) in mask px).

    `centroid` and `node` (the fitted grid position) are (x, y) mask px; `radius` is the grid's punch radius and
    `spacing` the smaller grid spacing, both in mask px. See the module docstring for the rules.
    """
    cx0, cy0 = centroid
    pts = rim_points(crop, origin, 2 * radius)
    fit: tuple[float, float, float] | None = None
    how = "grid node"
    if len(pts) >= 8:
        x, y, r = _fit_circle(pts, (cx0, cy0), None)
        lo, hi = RADIUS_RANGE
        if lo * radius <= r <= hi * radius and _arc_deg(pts, x, y) >= MIN_ARC_DEG:
            fit, how = (x, y, r), "arc"
        else:
            fit, how = _fit_circle(pts, node, radius), "grid radius"
        x, y, r = fit
        far = math.hypot(x - node[0], y - node[1]) > 0.5 * spacing
        if far or _inside_share(crop, origin, x, y, r) < MIN_INSIDE:
            fit, how = None, "grid node"
    if fit is None:
        if crop.sum() >= WHOLE_AREA * math.pi * radius**2:  # a whole core the rim does not describe (debris on it)
            return PunchFit(float(cx0), float(cy0), float(radius), False, "centroid")
        fit = (float(node[0]), float(node[1]), float(radius))
    x, y, r = fit
    if math.hypot(x - cx0, y - cy0) <= AGREE * 2 * radius:
        return PunchFit(float(cx0), float(cy0), float(r), False, "centroid")
    return PunchFit(float(x), float(y), float(r), True, how)
