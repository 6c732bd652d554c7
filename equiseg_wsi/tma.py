"""Dearray a TMA slide: find the cores on the low-resolution tissue mask, fit the grid, name cores like QuPath.

Why on the tissue mask: at ~8 µm/px a 0.6–2 mm core is 75–250 px, so a whole slide is a few megapixels and
dearraying takes well under a second once the mask exists; full resolution adds nothing to where a core is.

The steps, each robust to one way real TMAs go wrong:

1. **Pieces**: connected tissue components (4-connected, like `TissueMap.regions`); a piece too big for one
   core is split at its necks (erosion, then nearest seed), because punched cores often touch.
2. **Core size**: the most populated class of inscribed diameters (which touching cores share with single
   ones), weighted towards larger pieces (cores outnumber big debris and are larger than small debris),
   unless the caller gives `core_diameter_um`.
3. **Fragments**: pieces closer than a quarter diameter are joined, closest first, as long as the union still
   fits in one core (area and extent); so a broken core becomes one candidate and two neighbours never do.
   Pieces below 2% of a core's area are debris and never take part.
4. **Grid**: rotation from the nearest-neighbour vectors of well-formed (round, core-sized) candidates
   (angles folded modulo 90°), spacing per axis from their projections, then rows and columns by 1-D gap
   clustering of the de-rotated centres, where a gap of k spacings means k - 1 empty rows; the rotation is
   refined from the slope of the fitted rows and columns and everything is redone (4 rounds). Candidates that
   fit no row or column (off-grid blobs) are dropped. Any rotation below 45° is resolved (tested to ±42°);
   at 45° rows and columns are indistinguishable.
5. **Assignment**: every candidate of at least a fifth of a core's area goes to the nearest grid node within
   half a spacing (the grid grows by a row/column if a sizeable candidate lies one spacing beyond it); a node
   without a candidate is a *missing* core whose centre is the fitted node.

Coordinates returned are level-0 px of the slide (x right, y down); `rotation_deg` is the angle of the rows to
the image x axis, positive when rows descend to the right (clockwise on screen).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from equiseg_wsi.errors import InputError, NoTissueError
from equiseg_wsi.export.qptma import QptmaCore, expand_labels, qupath_core_name

if TYPE_CHECKING:
    from PIL import Image

    from equiseg_wsi.segment import RegionArea
    from equiseg_wsi.slide import Slide
    from equiseg_wsi.tissue import TissueMap

__all__ = [
    "CORE_CSV_COLUMNS",
    "TmaCore",
    "TmaGrid",
    "core_areas",
    "core_features",
    "core_rows",
    "dearray",
    "dearray_slide",
    "export_dearray",
    "is_tma",
    "read_case_ids",
    "render_grid",
]

_CROSS = ndimage.generate_binary_structure(2, 1)

# Pieces below this share of a core's area are debris: never a core, never a fragment.
MIN_PIECE = 0.02
# Fragments join when their gap is below this share of the diameter...
JOIN_GAP = 0.25
# ...and the union stays within one core: area and extent (bbox side) limits, relative to a core.
JOIN_MAX_AREA = 1.3
JOIN_MAX_EXTENT = 1.35
# A candidate core: at least this share of a core's area (smaller pieces cannot make a position present).
MIN_CANDIDATE = 0.2
# Candidates that may extend the grid beyond the well-formed cores must be at least this big.
MIN_EXTENDING = 0.35
# Gap clustering: a gap above this share of the spacing separates rows (columns).
SPLIT_GAP = 0.45
# Two row (column) clusters closer than this share of the spacing cannot both be rows: the smaller is dropped.
MIN_ROW_GAP = 0.7
# Erosion depths (share of the diameter) tried, in order, to split touching cores at their neck.
SPLIT_DEPTHS = (0.2, 0.27, 0.34)
# A well-formed candidate further than this share of the spacing from its row/column line is off-grid.
MAX_OFFSET = 0.3

#: Columns of the cores CSV, in order (row and column are 1-based: A-1 is row 1, column 1).
CORE_CSV_COLUMNS = (
    "name", "row", "column", "present", "bbox_x_px", "bbox_y_px", "bbox_width_px", "bbox_height_px",
    "centre_x_px", "centre_y_px", "diameter_um", "case_id",
)


@dataclass(frozen=True)
class TmaCore:
    """One grid position. Boxes and centres in level-0 px; `row`/`col` 0-based; `fragments` = tissue pieces.

    For a missing core, `bbox_level0` is the expected box (a circle of the grid's diameter at the fitted node),
    which QuPath's ``.qptma`` reader requires for every position.
    """

    name: str
    row: int
    col: int
    present: bool
    bbox_level0: tuple[float, float, float, float]
    centre_level0: tuple[float, float]
    diameter_um: float
    fragments: int = 0
    #: The core's tissue in the tissue mask: `mask_crop` covers mask pixels (col, row, width, height) `bbox_mask`.
    mask_crop: np.ndarray | None = field(default=None, compare=False, repr=False)
    bbox_mask: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass
class TmaGrid:
    """A dearrayed TMA: grid size, geometry and one `TmaCore` per position in row-major order.

    `rotation_deg`: angle of the rows to the image x axis (positive: rows descend to the right). `spacing_um`:
    mean centre-to-centre distance; `spacing_xy_um` = (along a row, along a column). `diameter_um`: the punch
    diameter (given or estimated). `mask_*` / `px_level0` record the tissue map the grid was fitted on.
    """

    n_rows: int
    n_cols: int
    rotation_deg: float
    spacing_um: float
    diameter_um: float
    cores: list[TmaCore]
    spacing_xy_um: tuple[float, float] = (0.0, 0.0)
    row_labels: list[str] = field(default_factory=list)
    col_labels: list[str] = field(default_factory=list)
    row_first: bool = True
    mask_shape: tuple[int, int] = (0, 0)
    mask_mpp: float = 0.0
    px_level0: float = 1.0

    def at(self, row: int, col: int) -> TmaCore:
        """The core at (row, col), 0-based."""
        if not (0 <= row < self.n_rows and 0 <= col < self.n_cols):
            raise IndexError(f"({row}, {col}) is outside the {self.n_rows} x {self.n_cols} grid")
        return self.cores[row * self.n_cols + col]

    def core(self, name: str) -> TmaCore:
        """The core called `name` (KeyError if there is none)."""
        for c in self.cores:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def present(self) -> list[TmaCore]:
        """The cores with tissue, row-major."""
        return [c for c in self.cores if c.present]

    def qptma_cores(self, case_ids: Mapping[str, str] | None = None) -> list[QptmaCore]:
        """The grid as rows of QuPath's ``.qptma`` file (pass to `write_qptma` with n_cols x n_rows)."""
        ids = case_ids or {}
        return [
            QptmaCore(c.name, *c.bbox_level0, present=c.present, case_id=str(ids.get(c.name, "")))
            for c in self.cores
        ]


# ----------------------------------------------------------------------------------------------------------
# Pieces, core size, fragments
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Pieces:
    labels: np.ndarray
    area: np.ndarray  # px, index = label - 1
    cy: np.ndarray
    cx: np.ndarray
    box: np.ndarray  # (n, 4) row0, col0, row1, col1 (exclusive)


def _pieces(labels: np.ndarray, n: int) -> _Pieces:
    """Area, centroid (px, pixel centres at +0.5), box of labels 1..n; per-piece crops keep memory small."""
    area = np.bincount(labels.ravel(), minlength=n + 1)[1 : n + 1].astype(np.float64)
    cy, cx = np.zeros(n), np.zeros(n)
    box = np.zeros((n, 4), dtype=np.int64)
    for i, sl in enumerate(ndimage.find_objects(labels, max_label=n)):
        if sl is None:
            continue
        rs, cs = np.nonzero(labels[sl] == i + 1)
        box[i] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
        cy[i] = sl[0].start + rs.mean() + 0.5
        cx[i] = sl[1].start + cs.mean() + 0.5
    return _Pieces(labels, area, cy, cx, box)


def _split_fused(p: _Pieces, core_area: float, diameter: float) -> _Pieces:
    """Split pieces too big for one core (touching cores) at their necks; re-joining is left to the next step.

    Erosion by a fifth of a diameter separates discs that touch; each pixel then goes to its nearest eroded
    seed. Pieces still too big are eroded deeper in the next pass (cores that overlap more). Over-splitting is
    harmless: fragments closer than the join gap are joined again if they fit one core.
    """
    for depth in SPLIT_DEPTHS:
        labels = p.labels
        n = int(p.area.size)
        changed = False
        for i in range(p.area.size):
            r0, c0, r1, c1 = p.box[i]
            extent = max(r1 - r0, c1 - c0)
            fused = p.area[i] > JOIN_MAX_AREA * core_area or extent > JOIN_MAX_EXTENT * diameter
            if not fused or p.area[i] > 12 * core_area:
                continue
            crop = labels[r0:r1, c0:c1] == i + 1
            dt = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
            seeds, k = ndimage.label(dt > depth * diameter, structure=np.ones((3, 3), bool))
            if k < 2:
                continue
            _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
            part = seeds[iy, ix]
            if not changed:
                labels = labels.copy()
                changed = True
            for j in range(2, k + 1):
                n += 1
                labels[r0:r1, c0:c1][crop & (part == j)] = n
        if changed:
            p = _pieces(labels, n)
    return p


def _core_area(p: _Pieces) -> float:
    """Typical core area (px), robust to touching cores, fragments and debris.

    Pieces are compared by their inscribed diameter (twice the largest distance to the background), which a
    pair of touching cores shares with a single core: the size class (within x1.3) with the most members, big
    members weighing more, gives the core size; its round members (area of about their inscribed circle) give
    the area. Pieces below 1% of the largest are ignored.
    """
    if p.area.size == 0:
        return 0.0
    use = np.flatnonzero(p.area >= max(4.0, 0.01 * float(p.area.max())))
    d = np.empty(use.size)
    for k, i in enumerate(use):  # per piece: crops are far smaller than the slide's mask
        r0, c0, r1, c1 = p.box[i]
        crop = np.pad(p.labels[r0:r1, c0:c1] == i + 1, 1)
        d[k] = 2 * float(ndimage.distance_transform_edt(crop).max())
    a = p.area[use]
    ld = np.log(np.maximum(d, 1.0))
    similar = np.abs(ld[:, None] - ld[None, :]) < math.log(1.3)
    best = int(np.argmax(similar.sum(axis=1) * d))
    members = similar[best]
    round_ = members & (a <= 1.3 * math.pi / 4 * d**2)
    if round_.any():
        return float(np.median(a[round_]))
    return float(math.pi / 4 * np.median(d[members]) ** 2)


def _boundary_points(labels: np.ndarray, box: np.ndarray, label: int) -> np.ndarray:
    r0, c0, r1, c1 = box
    crop = labels[r0:r1, c0:c1] == label
    edge = crop & ~ndimage.binary_erosion(crop, structure=_CROSS)
    pts = np.argwhere(edge).astype(np.float64)
    return pts + (r0, c0)


def _join_fragments(p: _Pieces, keep: np.ndarray, core_area: float, diameter: float) -> list[list[int]]:
    """Groups of piece indices (0-based) that form one core each; every kept piece is in exactly one group."""
    idx = np.flatnonzero(keep)
    parent = {int(i): int(i) for i in idx}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    gap_max = JOIN_GAP * diameter
    boxes = p.box[idx].astype(np.float64)
    # Candidate pairs: boxes within gap_max of each other (cheap), then the exact gap from boundary pixels.
    lo_r, lo_c, hi_r, hi_c = (boxes[:, k] for k in range(4))
    close = (
        (lo_r[:, None] <= hi_r[None, :] + gap_max) & (lo_r[None, :] <= hi_r[:, None] + gap_max)
        & (lo_c[:, None] <= hi_c[None, :] + gap_max) & (lo_c[None, :] <= hi_c[:, None] + gap_max)
    )
    ii, jj = np.nonzero(np.triu(close, k=1))
    pairs: list[tuple[float, int, int]] = []
    cache: dict[int, np.ndarray] = {}
    for a, b in zip(ii, jj, strict=True):
        ia, ib = int(idx[a]), int(idx[b])
        for k in (ia, ib):
            if k not in cache:
                cache[k] = _boundary_points(p.labels, p.box[k], k + 1)
        dist, _ = cKDTree(cache[ib]).query(cache[ia], k=1, distance_upper_bound=gap_max + 1)
        gap = float(dist.min()) - 1.0  # adjacent boundary pixels across a 1 px gap are 2 px apart
        if gap <= gap_max:
            pairs.append((gap, ia, ib))
    pairs.sort()
    g_area = {int(i): float(p.area[i]) for i in idx}
    g_box = {int(i): p.box[i].astype(np.float64).copy() for i in idx}
    for _, ia, ib in pairs:
        ra, rb = find(ia), find(ib)
        if ra == rb:
            continue
        area = g_area[ra] + g_area[rb]
        box = np.concatenate([np.minimum(g_box[ra][:2], g_box[rb][:2]), np.maximum(g_box[ra][2:], g_box[rb][2:])])
        extent = max(box[2] - box[0], box[3] - box[1])
        if area > JOIN_MAX_AREA * core_area or extent > JOIN_MAX_EXTENT * diameter:
            continue
        parent[rb] = ra
        g_area[ra], g_box[ra] = area, box
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(find(int(i)), []).append(int(i))
    return list(groups.values())


@dataclass
class _Candidate:
    pieces: list[int]
    area: float
    cy: float
    cx: float
    box: np.ndarray  # row0, col0, row1, col1
    good: bool


def _candidates(p: _Pieces, core_area: float, diameter: float) -> list[_Candidate]:
    keep = p.area >= MIN_PIECE * core_area
    out = []
    for group in _join_fragments(p, keep, core_area, diameter):
        g = np.asarray(group)
        area = float(p.area[g].sum())
        if area < MIN_CANDIDATE * core_area:
            continue
        cy = float((p.cy[g] * p.area[g]).sum() / area)
        cx = float((p.cx[g] * p.area[g]).sum() / area)
        box = np.concatenate([p.box[g, :2].min(axis=0), p.box[g, 2:].max(axis=0)])
        h, w = float(box[2] - box[0]), float(box[3] - box[1])
        if max(h, w) > 1.8 * diameter or area > 2.5 * core_area:
            continue  # not one core: a large section, a label, or cores fused together
        fill = area / (math.pi / 4 * h * w)
        good = (
            0.5 * core_area <= area <= 1.6 * core_area and fill >= 0.7 and min(h, w) >= 0.6 * max(h, w)
            and max(h, w) <= 1.4 * diameter
        )
        out.append(_Candidate(sorted(group), area, cy, cx, box, bool(good)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Grid fitting
# ----------------------------------------------------------------------------------------------------------


def _rotate(xy: np.ndarray, theta: float) -> np.ndarray:
    """Image (x, y) -> grid frame (u along rows, v along columns) for a grid rotated by theta."""
    c, s = math.cos(theta), math.sin(theta)
    return np.stack([xy[:, 0] * c + xy[:, 1] * s, -xy[:, 0] * s + xy[:, 1] * c], axis=1)


def _unrotate(uv: np.ndarray, theta: float) -> np.ndarray:
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
    dist, idx = cKDTree(xy).query(xy, k=k)
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
    uv = _rotate(vec.reshape(-1, 2), theta)
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
class _Axis:
    index: np.ndarray  # per point, -1 = outlier
    pos: np.ndarray  # coordinate of each row/column along the axis
    spacing: float


def _cluster_axis(values: np.ndarray, spacing: float, valid: np.ndarray) -> _Axis:
    """Rows (or columns) by 1-D gap clustering; a gap of k spacings leaves k - 1 empty rows between."""
    index = np.full(len(values), -1, dtype=np.int64)
    order = np.flatnonzero(valid)[np.argsort(values[valid], kind="stable")]
    if order.size == 0:
        return _Axis(index, np.zeros(0), spacing)
    cuts = np.flatnonzero(np.diff(values[order]) > SPLIT_GAP * spacing) + 1
    clusters = [list(c) for c in np.split(order, cuts)]
    # Clusters too close to be two rows: the smaller is off-grid.
    changed = True
    while changed and len(clusters) > 1:
        changed = False
        means = [float(values[c].mean()) for c in clusters]
        for i in range(len(clusters) - 1):
            if means[i + 1] - means[i] < MIN_ROW_GAP * spacing:
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
    return _Axis(index, pos, spacing)


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
class _Fit:
    theta: float
    rows: _Axis
    cols: _Axis
    valid: np.ndarray


def _fit_grid(xy: np.ndarray, diameter: float) -> _Fit:
    theta, su, sv = _initial_geometry(xy, diameter)
    valid = np.ones(len(xy), bool)
    for _ in range(4):
        uv = _rotate(xy, theta)
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
    uv = _rotate(xy, theta)
    cols = _cluster_axis(uv[:, 0], su, valid)
    rows = _cluster_axis(uv[:, 1], sv, valid)
    return _Fit(theta, rows, cols, valid & (cols.index >= 0) & (rows.index >= 0))


def _refined_spacing(axis: _Axis, spacing: float) -> float:
    if axis.pos.size < 2:
        return spacing
    return float((axis.pos[-1] - axis.pos[0]) / (axis.pos.size - 1))


def _place(value: float, axis: _Axis, allow_extend: bool) -> int | None:
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
    return base + k


def _extend(axis: _Axis, k: int) -> None:
    """Grow the axis so index k exists (k < 0 prepends rows)."""
    s = axis.spacing
    if k < 0:
        axis.pos = np.concatenate([axis.pos[0] + s * np.arange(k, 0), axis.pos])
        axis.index[axis.index >= 0] -= k
    elif k >= axis.pos.size:
        axis.pos = np.concatenate([axis.pos, axis.pos[-1] + s * np.arange(1, k - axis.pos.size + 2)])


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _analyse(tissue: TissueMap, core_diameter_um: float | None) -> tuple[_Pieces, list[_Candidate], float, float]:
    """Pieces, candidates, core area (px) and diameter (px) of a tissue mask."""
    labels, n = ndimage.label(np.asarray(tissue.mask, dtype=bool), structure=_CROSS)
    p = _pieces(labels, n)
    if p.area.size == 0:
        return p, [], 0.0, 0.0
    if core_diameter_um is not None:
        if not core_diameter_um > 0:
            raise InputError(f"core diameter must be positive, got {core_diameter_um} µm")
        diameter = float(core_diameter_um) / tissue.mpp
        core_area = math.pi / 4 * diameter**2
    else:
        core_area = _core_area(p)
        diameter = 2 * math.sqrt(core_area / math.pi)
    p = _split_fused(p, core_area, diameter)
    return p, _candidates(p, core_area, diameter), core_area, diameter


def dearray(
    tissue: TissueMap,
    *,
    core_diameter_um: float | None = None,
    row_labels: str | Sequence[str] | None = None,
    col_labels: str | Sequence[str] | None = None,
    row_first: bool = True,
) -> TmaGrid:
    """Fit the TMA grid on a slide's tissue map (see the module docstring); raise NoTissueError if no core.

    `core_diameter_um`: punch diameter (default: estimated). `row_labels` / `col_labels`: QuPath-style specs
    (``"A-H"``, ``"1-12"``, comma lists; default letters for rows, numbers for columns); `row_first=False`
    names cores ``1-A`` instead of ``A-1``.
    """
    p, cands, core_area, diameter = _analyse(tissue, core_diameter_um)
    good = [c for c in cands if c.good] or cands
    if not good:
        raise NoTissueError("no TMA cores found: no tissue piece has the size of a core")
    xy = np.array([(c.cx, c.cy) for c in good])
    if core_diameter_um is None:  # the punch diameter: box sides of well-formed cores (area misses tears)
        sides = [(c.box[2] - c.box[0] + c.box[3] - c.box[1]) / 2 for c in good if c.good]
        diameter = float(np.median(sides)) if sides else diameter
    fit = _fit_grid(xy, diameter)
    if not fit.valid.any():
        raise NoTissueError("no TMA grid found: the core candidates do not line up in rows and columns")

    # Assign every candidate (well-formed or not) to a node; sizeable ones may grow the grid.
    assigned: dict[tuple[int, int], list[_Candidate]] = {}
    for c in sorted(cands, key=lambda c: -c.area):
        u, v = _rotate(np.array([[c.cx, c.cy]]), fit.theta)[0]
        extend = c.area >= MIN_EXTENDING * core_area
        col = _place(u, fit.cols, extend)
        row = _place(v, fit.rows, extend)
        if col is None or row is None:
            continue
        if col < 0 or col >= fit.cols.pos.size:
            _extend(fit.cols, col)
            if col < 0:
                assigned = {(r, cc - col): v_ for (r, cc), v_ in assigned.items()}
                col = 0
        if row < 0 or row >= fit.rows.pos.size:
            _extend(fit.rows, row)
            if row < 0:
                assigned = {(r - row, cc): v_ for (r, cc), v_ in assigned.items()}
                row = 0
        assigned.setdefault((row, col), []).append(c)

    n_rows, n_cols = fit.rows.pos.size, fit.cols.pos.size
    rl = _labels(row_labels, n_rows, "letters", "row")
    cl = _labels(col_labels, n_cols, "numbers", "column")
    s0, mpp = tissue.px_level0, tissue.mpp
    radius = diameter / 2
    cores: list[TmaCore] = []
    for r in range(n_rows):
        for c in range(n_cols):
            name = qupath_core_name(r, c, rl, cl, row_first=row_first)
            group = assigned.get((r, c))
            if group:
                idx = sorted(i for g in group for i in g.pieces)
                area = float(p.area[idx].sum())
                cy = float((p.cy[idx] * p.area[idx]).sum() / area)
                cx = float((p.cx[idx] * p.area[idx]).sum() / area)
                r0, c0 = (int(v) for v in p.box[idx, :2].min(axis=0))
                r1, c1 = (int(v) for v in p.box[idx, 2:].max(axis=0))
                crop = np.isin(p.labels[r0:r1, c0:c1], np.asarray(idx) + 1)
                cores.append(TmaCore(
                    name, r, c, True,
                    (float(c0 * s0), float(r0 * s0), float((c1 - c0) * s0), float((r1 - r0) * s0)),
                    (cx * s0, cy * s0), 2 * math.sqrt(area / math.pi) * mpp, len(idx), crop,
                    (c0, r0, c1 - c0, r1 - r0),
                ))
            else:
                node = _unrotate(np.array([[fit.cols.pos[c], fit.rows.pos[r]]]), fit.theta)[0]
                x, y = node * s0
                cores.append(TmaCore(
                    name, r, c, False, (float(x - radius * s0), float(y - radius * s0), 2 * radius * s0,
                                        2 * radius * s0),
                    (float(x), float(y)), diameter * mpp, 0,
                ))
    su, sv = fit.cols.spacing * mpp, fit.rows.spacing * mpp
    return TmaGrid(
        n_rows=n_rows, n_cols=n_cols, rotation_deg=math.degrees(fit.theta), spacing_um=(su + sv) / 2,
        diameter_um=diameter * mpp, cores=cores, spacing_xy_um=(su, sv), row_labels=rl, col_labels=cl,
        row_first=row_first, mask_shape=tuple(tissue.mask.shape), mask_mpp=mpp, px_level0=s0,
    )


def _labels(spec: str | Sequence[str] | None, n: int, default: str, what: str) -> list[str]:
    try:
        return expand_labels(spec, n, default=default)
    except InputError as exc:
        text = str(exc) + (f" {what}s" if str(exc)[-1:].isdigit() else "")
        raise InputError(f"{what} labels: {text}") from exc


def dearray_slide(
    slide: Slide,
    tissue_mpp: float = 8.0,
    *,
    core_diameter_um: float | None = None,
    row_labels: str | Sequence[str] | None = None,
    col_labels: str | Sequence[str] | None = None,
    row_first: bool = True,
) -> tuple[TmaGrid, TissueMap]:
    """Detect tissue at `tissue_mpp` µm/px and dearray it; returns the grid and the tissue map it used."""
    from equiseg_wsi.tissue import detect_tissue

    tissue = detect_tissue(slide, tissue_mpp)
    grid = dearray(tissue, core_diameter_um=core_diameter_um, row_labels=row_labels, col_labels=col_labels,
                   row_first=row_first)
    return grid, tissue


def is_tma(tissue: TissueMap, *, core_diameter_um: float | None = None) -> bool:
    """True when the tissue looks like a TMA: >= 4 similar, round pieces on a lattice holding most tissue.

    For the runner's auto-detection: a whole-slide section, a few biopsies or scattered debris are not TMAs.
    """
    p, cands, core_area, diameter = _analyse(tissue, core_diameter_um)
    good = [c for c in cands if c.good]
    if len(good) < 4:
        return False
    areas = np.array([c.area for c in good])
    if float(areas.std() / areas.mean()) > 0.4:
        return False
    # Most tissue (ignoring dust below a core's 2%) must be in core candidates.
    total = float(p.area[p.area >= MIN_PIECE * core_area].sum())
    if sum(c.area for c in cands) < 0.6 * total:
        return False
    xy = np.array([(c.cx, c.cy) for c in good])
    fit = _fit_grid(xy, diameter)
    n_nodes = fit.rows.pos.size * fit.cols.pos.size
    spacing = min(fit.rows.spacing, fit.cols.spacing) if fit.rows.pos.size > 1 else fit.cols.spacing
    return bool(
        fit.valid.sum() >= 4 and fit.valid.mean() >= 0.75 and n_nodes >= 4 and fit.valid.sum() >= 0.3 * n_nodes
        and 0.9 * diameter <= spacing <= 4 * diameter
    )


def core_areas(grid: TmaGrid, tissue: TissueMap) -> list[RegionArea]:
    """One `RegionArea` per present core (row-major), named after it; its tissue map keeps only its pieces.

    `tissue` must be the map `grid` was fitted on (same mask geometry): each core keeps its pieces' pixels.
    """
    from equiseg_wsi.segment import RegionArea
    from equiseg_wsi.tissue import TissueMap

    if tuple(tissue.mask.shape) != tuple(grid.mask_shape) or not math.isclose(tissue.px_level0, grid.px_level0):
        raise InputError(
            f"tissue map {tissue.mask.shape} at {tissue.px_level0:.4g} level-0 px/px is not the one the grid was "
            f"fitted on {grid.mask_shape} at {grid.px_level0:.4g}"
        )
    out = []
    for core in grid.present:
        mask = np.zeros(tissue.mask.shape, dtype=bool)
        c0, r0, w, h = core.bbox_mask
        if core.mask_crop is not None:
            mask[r0 : r0 + h, c0 : c0 + w] = core.mask_crop & np.asarray(tissue.mask[r0 : r0 + h, c0 : c0 + w], bool)
        region = TissueMap(mask=mask, mpp=tissue.mpp, px_level0=tissue.px_level0, tissue_fraction=float(mask.mean()))
        out.append(RegionArea(core.name, core.bbox_level0, region))
    return out


# ----------------------------------------------------------------------------------------------------------
# Outputs: case ids, CSV rows, QuPath annotations, overview picture, all files
# ----------------------------------------------------------------------------------------------------------

_NAME_KEYS = ("core", "core name", "core_name", "name", "core id", "core_id")
_CASE_KEYS = ("case id", "case_id", "case", "unique id", "unique_id", "patient", "patient id", "patient_id")


def read_case_ids(path: str | os.PathLike[str]) -> dict[str, str]:
    """Core name -> case id from a CSV (header with a core-name and a case-id column, or two plain columns)."""
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{target}: cannot read case ids ({exc.__class__.__name__}: {exc})") from exc
    rows = [r for r in csv.reader(text.splitlines()) if any(cell.strip() for cell in r)]
    if not rows:
        raise InputError(f"{target}: no rows (expected columns: core name, case id)")
    header = [h.strip().lower() for h in rows[0]]
    ni = next((header.index(k) for k in _NAME_KEYS if k in header), None)
    ci = next((header.index(k) for k in _CASE_KEYS if k in header), None)
    has_header = ni is not None or ci is not None
    if ni is None:
        ni = 0 if ci != 0 else 1
    if ci is None:
        ci = 1 if ni != 1 else 0
    if len(header) < 2:
        raise InputError(f"{target}: need two columns, core name and case id")
    if has_header:
        rows = rows[1:]
    out: dict[str, str] = {}
    for n, r in enumerate(rows, start=2):
        if max(ni, ci) >= len(r):
            raise InputError(f"{target}:{n}: expected at least {max(ni, ci) + 1} columns")
        name, case = r[ni].strip(), r[ci].strip()
        if not name:
            continue
        if any(ch in case for ch in "\t\r\n"):
            raise InputError(f"{target}:{n}: case id {case!r} contains a tab or newline")
        if name in out and out[name] != case:
            raise InputError(f"{target}:{n}: core {name} has two case ids ({out[name]!r}, {case!r})")
        out[name] = case
    return out


def core_rows(grid: TmaGrid, case_ids: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One dict per grid position with `CORE_CSV_COLUMNS` (row/column 1-based, boxes in level-0 px)."""
    ids = case_ids or {}
    rows = []
    for c in grid.cores:
        x, y, w, h = c.bbox_level0
        rows.append(dict(zip(CORE_CSV_COLUMNS, (
            c.name, c.row + 1, c.col + 1, c.present, round(x, 2), round(y, 2), round(w, 2), round(h, 2),
            round(c.centre_level0[0], 2), round(c.centre_level0[1], 2), round(c.diameter_um, 2),
            str(ids.get(c.name, "")),
        ), strict=True)))
    return rows


def _ellipse(x: float, y: float, w: float, h: float, n: int = 72) -> Any:
    from shapely.geometry import Polygon

    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return Polygon(np.stack([x + w / 2 + w / 2 * np.cos(t), y + h / 2 + h / 2 * np.sin(t)], axis=1))


#: QuPath classes of core outlines (QuPath's own TMA colours: present cores light, missing ones dark red).
PRESENT_CLASS = ("TMA core", (80, 180, 80))
MISSING_CLASS = ("TMA core missing", (180, 60, 60))


def core_features(
    grid: TmaGrid, slide_name: str, case_ids: Mapping[str, str] | None = None, *, include_missing: bool = True,
) -> list[dict[str, Any]]:
    """QuPath annotations, one ellipse per core in its bounding box, named after the core (ids from uuid5).

    Missing positions (if included) get the class ``TMA core missing`` so they can be told apart or removed.
    """
    from equiseg_wsi.export.geojson import object_id, qupath_feature

    ids = case_ids or {}
    feats = []
    for c in grid.cores:
        if not c.present and not include_missing:
            continue
        cls, color = PRESENT_CLASS if c.present else MISSING_CLASS
        meta = {"core": c.name, "row": str(c.row + 1), "column": str(c.col + 1), "present": str(c.present).lower()}
        if ids.get(c.name):
            meta["case_id"] = str(ids[c.name])
        feats.append(qupath_feature(
            _ellipse(*c.bbox_level0), object_id=object_id(slide_name, "tma-core", c.name), name=c.name,
            class_name=cls, color=color,
            measurements={"Core diameter µm": round(c.diameter_um, 3), "Fragments": c.fragments},
            metadata=meta,
        ))
    return feats


def render_grid(grid: TmaGrid, rgb: np.ndarray, level0_per_px: float) -> Image.Image:
    """The thumbnail `rgb` (level-0 px per pixel given) with grid lines, core circles and names drawn.

    Present cores: green circle and name; missing positions: red dashed circle with a cross.
    """
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("RGB")
    draw = ImageDraw.Draw(img)
    f = 1.0 / level0_per_px
    r_px = grid.diameter_um / grid.mask_mpp * grid.px_level0 * f / 2 if grid.mask_mpp else 10.0
    size = int(max(9, min(40, r_px * 0.45)))
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pts = {(c.row, c.col): (c.centre_level0[0] * f, c.centre_level0[1] * f) for c in grid.cores}
    line = (70, 110, 200)
    width = max(1, int(r_px / 25))
    for r in range(grid.n_rows):
        draw.line([pts[(r, c)] for c in range(grid.n_cols)], fill=line, width=width)
    for c in range(grid.n_cols):
        draw.line([pts[(r, c)] for r in range(grid.n_rows)], fill=line, width=width)
    for core in grid.cores:
        x, y, w, h = (v * f for v in core.bbox_level0)
        cx, cy = x + w / 2, y + h / 2
        if core.present:
            draw.ellipse([x, y, x + w, y + h], outline=(30, 160, 60), width=max(2, width * 2))
            color = (0, 90, 20)
        else:
            rr = max(w, h) / 2
            for k in range(0, 360, 30):  # dashed circle
                draw.arc([cx - rr, cy - rr, cx + rr, cy + rr], k, k + 15, fill=(200, 40, 40), width=max(2, width * 2))
            d = rr * 0.5
            draw.line([cx - d, cy - d, cx + d, cy + d], fill=(200, 40, 40), width=max(1, width))
            draw.line([cx - d, cy + d, cx + d, cy - d], fill=(200, 40, 40), width=max(1, width))
            color = (170, 20, 20)
        draw.text((cx, cy), core.name, fill=color, font=font, anchor="mm", stroke_width=2, stroke_fill=(255, 255, 255))
    return img


def export_dearray(
    grid: TmaGrid,
    slide: Slide,
    out_dir: str | os.PathLike[str],
    *,
    case_ids: Mapping[str, str] | None = None,
    thumbnail_px: int = 1600,
) -> dict[str, Path]:
    """Write ``<slide>.qptma``, ``<slide>_cores.geojson``, ``<slide>_cores.csv`` and ``<slide>_grid.png``.

    The overview is read from the slide with its long side at most `thumbnail_px` (never finer than level 0).
    Returns the paths by kind (qptma, geojson, csv, png).
    """
    from PIL import Image

    from equiseg_wsi.biomarkers import write_csv
    from equiseg_wsi.export.geojson import write_geojson
    from equiseg_wsi.export.overlay import save_png
    from equiseg_wsi.export.qptma import write_qptma

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(slide.path).stem
    paths = {
        "qptma": out / f"{stem}.qptma",
        "geojson": out / f"{stem}_cores.geojson",
        "csv": out / f"{stem}_cores.csv",
        "png": out / f"{stem}_grid.png",
    }
    write_qptma(paths["qptma"], grid.qptma_cores(case_ids), grid.n_cols, grid.n_rows)
    write_geojson(paths["geojson"], core_features(grid, Path(slide.path).name, case_ids))
    write_csv(paths["csv"], core_rows(grid, case_ids))
    thumb_mpp = max(slide.mpp, max(slide.width, slide.height) * slide.mpp / max(thumbnail_px, 16))
    rgb = slide.read_full(thumb_mpp)
    picture = render_grid(grid, rgb, thumb_mpp / slide.mpp)
    # 256 colours (no dithering) keep the PNG ~3x smaller and are plenty for an overview.
    save_png(paths["png"], picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
    return paths
