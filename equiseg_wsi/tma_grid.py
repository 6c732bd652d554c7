"""TMA grid fitting: rotation, spacing, rows and columns from core centres (step 4 of `equiseg_wsi.tma`).

Split from `equiseg_wsi.tma`, which describes all steps; everything here is in mask px, (x, y) image coordinates
and (u, v) grid coordinates (u along rows, v along columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_OFFSET", "Axis", "Fit", "extend", "fit_grid", "place", "rotate", "unrotate"]

# Gap clustering: a gap above this share of the spacing separates rows (columns).
SPLIT_GAP = 0.45
# Two row (column) clusters closer than this share of the spacing cannot both be rows: the smaller is dropped.
MIN_ROW_GAP = 0.7
# A well-formed candidate further than this share of the spacing from its row/column line is off-grid.
MAX_OFFSET = 0.3


def rotate(xy: np.ndarray, theta: float) -> np.ndarray:
    """Image (x, y) -> grid frame (u along rows, v along columns) for a grid rotated by theta."""
    c, s = math.cos(theta), math.sin(theta)
    return np.stack([xy[:, 0] * c + xy[:, 1] * s, -xy[:, 0] * s + xy[:, 1] * c], axis=1)


def unrotate(uv: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.stack([uv[:, 0] * c - uv[:, 1] * s, uv[:, 0] * s + uv[:, 1] * c], axis=1)


def _fundamental(values: np.ndarray, floor: float) -> float:
    """The spacing behind distances that are multiples of it (missing neighbours give 2x, 3x...)."""
    v = np.sort(values[values >= floor])
    if v.size == 0:
        return math.nan
    base = float(np.percentile(v, 10))
    return float(np.median(v[v < 1.5 * base]))


def _initial_geometry(xy: np.ndarray, diameter: float) -> tuple[float, float, float]:
    """(theta, spacing_u, spacing_v) from nearest-neighbour vectors."""
    n = len(xy)
    if n < 2:
        return 0.0, 1.5 * diameter, 1.5 * diameter
    k = min(n, 9)
    from scipy.spatial import cKDTree  # here: only TMA slides need it (0.2 s of start-up)

    found = cKDTree(xy).query(xy, k=k)
    dist, idx = np.asarray(found[0]), np.asarray(found[1])
    vec = xy[idx[:, 1:]] - xy[:, None, :]
    d = dist[:, 1:]
    nn_med = float(np.median(d[:, 0]))
    sel = (d <= 1.35 * nn_med) & (d >= 0.7 * diameter)
    if sel.any():
        ang = np.arctan2(vec[..., 1][sel], vec[..., 0][sel])
        z = np.exp(4j * ang).sum()
        theta = float(np.angle(z) / 4)
    else:
        theta = 0.0
    uv = rotate(vec.reshape(-1, 2), theta)
    du, dv = np.abs(uv[:, 0]), np.abs(uv[:, 1])
    tan15 = math.tan(math.radians(15))
    su = _fundamental(du[dv < tan15 * du], 0.7 * diameter)
    sv = _fundamental(dv[du < tan15 * dv], 0.7 * diameter)
    if math.isnan(su) and math.isnan(sv):
        su = sv = max(nn_med, diameter)
    su = sv if math.isnan(su) else su
    sv = su if math.isnan(sv) else sv
    return theta, su, sv


@dataclass
class Axis:
    index: np.ndarray  # per point, -1 = outlier
    pos: np.ndarray  # coordinate of each row/column along the axis
    spacing: float


def _cluster_axis(values: np.ndarray, spacing: float, valid: np.ndarray) -> Axis:
    """Rows (or columns) by 1-D gap clustering; a gap of k spacings leaves k - 1 empty rows between."""
    index = np.full(len(values), -1, dtype=np.int64)
    order = np.flatnonzero(valid)[np.argsort(values[valid], kind="stable")]
    if order.size == 0:
        return Axis(index, np.zeros(0), spacing)
    cuts = np.flatnonzero(np.diff(values[order]) > SPLIT_GAP * spacing) + 1
    clusters = [list(c) for c in np.split(order, cuts)]
    # Clusters too close to be two rows: the smaller is off-grid.
    changed = True
    while changed and len(clusters) > 1:
        changed = False
        centres = [float(values[c].mean()) for c in clusters]
        for i in range(len(clusters) - 1):
            if centres[i + 1] - centres[i] < MIN_ROW_GAP * spacing:
                drop = i if len(clusters[i]) < len(clusters[i + 1]) else i + 1
                del clusters[drop]
                changed = True
                break
    means = np.array([float(values[c].mean()) for c in clusters])
    steps = np.maximum(1, np.round(np.diff(means) / spacing)).astype(np.int64)
    ks = np.concatenate([[0], np.cumsum(steps)])
    for k, c in zip(ks, clusters, strict=True):
        index[c] = k
    pos = np.interp(np.arange(ks[-1] + 1), ks, means)
    return Axis(index, pos, spacing)


def _pooled_slope(a: np.ndarray, b: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Common slope of b against a within groups, and its weight (sum of squares of a)."""
    num = den = 0.0
    for g in np.unique(group[group >= 0]):
        m = group == g
        if m.sum() < 2:
            continue
        da, db = a[m] - a[m].mean(), b[m] - b[m].mean()
        num += float((da * db).sum())
        den += float((da * da).sum())
    return (num / den if den > 0 else 0.0), den


@dataclass
class Fit:
    theta: float
    rows: Axis
    cols: Axis
    valid: np.ndarray


def fit_grid(xy: np.ndarray, diameter: float) -> Fit:
    theta, su, sv = _initial_geometry(xy, diameter)
    valid = np.ones(len(xy), bool)
    for _ in range(4):
        uv = rotate(xy, theta)
        cols = _cluster_axis(uv[:, 0], su, valid)
        rows = _cluster_axis(uv[:, 1], sv, valid)
        ok = valid & (cols.index >= 0) & (rows.index >= 0)
        # Off-grid: too far from the line of its row or column.
        off = np.zeros(len(xy), bool)
        off[ok] = (np.abs(uv[ok, 0] - cols.pos[cols.index[ok]]) > MAX_OFFSET * su) | (
            np.abs(uv[ok, 1] - rows.pos[rows.index[ok]]) > MAX_OFFSET * sv
        )
        valid = ok & ~off
        # Residual rotation from the slopes of rows (v against u) and of columns (u against v).
        slope_r, w_r = _pooled_slope(uv[valid, 0], uv[valid, 1], rows.index[valid])
        slope_c, w_c = _pooled_slope(uv[valid, 1], uv[valid, 0], cols.index[valid])
        if w_r + w_c > 0:
            theta += (w_r * math.atan(slope_r) - w_c * math.atan(slope_c)) / (w_r + w_c)
        # Spacing refined from the fitted rows/columns (mean step between occupied neighbours).
        su = _refined_spacing(cols, su)
        sv = _refined_spacing(rows, sv)
    uv = rotate(xy, theta)
    cols = _cluster_axis(uv[:, 0], su, valid)
    rows = _cluster_axis(uv[:, 1], sv, valid)
    return Fit(theta, rows, cols, valid & (cols.index >= 0) & (rows.index >= 0))


def _refined_spacing(axis: Axis, spacing: float) -> float:
    if axis.pos.size < 2:
        return spacing
    return float((axis.pos[-1] - axis.pos[0]) / (axis.pos.size - 1))


def place(value: float, axis: Axis, allow_extend: bool) -> int | None:
    """Index of the row (column) that `value` belongs to; beyond the ends a new index if allowed."""
    pos, s = axis.pos, axis.spacing
    if pos.size == 0:
        return None
    i = int(np.argmin(np.abs(pos - value)))
    if abs(pos[i] - value) <= 0.5 * s:
        return i
    if not allow_extend or pos[0] <= value <= pos[-1]:
        return None
    ref, base = (pos[0], 0) if value < pos[0] else (pos[-1], pos.size - 1)
    k = round((value - ref) / s)
    if k == 0 or abs(value - ref - k * s) > MAX_OFFSET * s:
        return None
    return int(base + k)


def extend(axis: Axis, k: int) -> None:
    """Grow the axis so index k exists (k < 0 prepends rows)."""
    s = axis.spacing
    if k < 0:
        axis.pos = np.concatenate([axis.pos[0] + s * np.arange(k, 0), axis.pos])
        axis.index[axis.index >= 0] -= k
    elif k >= axis.pos.size:
        axis.pos = np.concatenate([axis.pos, axis.pos[-1] + s * np.arange(1, k - axis.pos.size + 2)])
