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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial import cKDTree

from equiseg_wsi.errors import InputError, NoTissueError
from equiseg_wsi.export.qptma import QptmaCore, expand_labels, qupath_core_name
from equiseg_wsi.tma_candidates import MIN_PIECE, Candidate, Pieces, analyse

if TYPE_CHECKING:
    from equiseg_wsi.slide import Slide
    from equiseg_wsi.tissue import TissueMap

__all__ = ["TmaCore", "TmaGrid", "dearray", "dearray_slide", "is_tma"]

# Candidates that may extend the grid beyond the well-formed cores must be at least this big.
MIN_EXTENDING = 0.35
# Gap clustering: a gap above this share of the spacing separates rows (columns).
SPLIT_GAP = 0.45
# Two row (column) clusters closer than this share of the spacing cannot both be rows: the smaller is dropped.
MIN_ROW_GAP = 0.7
# A well-formed candidate further than this share of the spacing from its row/column line is off-grid.
MAX_OFFSET = 0.3


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
    return int(base + k)


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
    p, cands, core_area, diameter = analyse(tissue, core_diameter_um)
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

    assigned = _assign(cands, fit, core_area)
    n_rows, n_cols = fit.rows.pos.size, fit.cols.pos.size
    rl = _labels(row_labels, n_rows, "letters", "row")
    cl = _labels(col_labels, n_cols, "numbers", "column")
    s0, mpp = tissue.px_level0, tissue.mpp
    cores: list[TmaCore] = []
    for r in range(n_rows):
        for c in range(n_cols):
            name = qupath_core_name(r, c, rl, cl, row_first=row_first)
            group = assigned.get((r, c))
            if group:
                cores.append(_present_core(name, r, c, group, p, s0, mpp))
            else:
                cores.append(_missing_core(name, r, c, fit, diameter, s0, mpp))
    su, sv = fit.cols.spacing * mpp, fit.rows.spacing * mpp
    return TmaGrid(
        n_rows=n_rows, n_cols=n_cols, rotation_deg=math.degrees(fit.theta), spacing_um=(su + sv) / 2,
        diameter_um=diameter * mpp, cores=cores, spacing_xy_um=(su, sv), row_labels=rl, col_labels=cl,
        row_first=row_first, mask_shape=tuple(tissue.mask.shape), mask_mpp=mpp, px_level0=s0,
    )


def _assign(cands: list[Candidate], fit: _Fit, core_area: float) -> dict[tuple[int, int], list[Candidate]]:
    """Candidates (well-formed or not) by grid node (row, col), largest first; sizeable ones may grow `fit`."""
    assigned: dict[tuple[int, int], list[Candidate]] = {}
    for cand in sorted(cands, key=lambda c: -c.area):
        u, v = _rotate(np.array([[cand.cx, cand.cy]]), fit.theta)[0]
        extend = cand.area >= MIN_EXTENDING * core_area
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
        assigned.setdefault((row, col), []).append(cand)
    return assigned


def _present_core(
    name: str, r: int, c: int, group: list[Candidate], p: Pieces, s0: float, mpp: float,
) -> TmaCore:
    """The core made of the pieces of `group` (`s0`: level-0 px per mask px, `mpp`: µm per mask px)."""
    idx = sorted(i for g in group for i in g.pieces)
    area = float(p.area[idx].sum())
    cy = float((p.cy[idx] * p.area[idx]).sum() / area)
    cx = float((p.cx[idx] * p.area[idx]).sum() / area)
    r0, c0 = (int(v) for v in p.box[idx, :2].min(axis=0))
    r1, c1 = (int(v) for v in p.box[idx, 2:].max(axis=0))
    crop = np.isin(p.labels[r0:r1, c0:c1], np.asarray(idx) + 1)
    return TmaCore(
        name, r, c, True,
        (float(c0 * s0), float(r0 * s0), float((c1 - c0) * s0), float((r1 - r0) * s0)),
        (cx * s0, cy * s0), 2 * math.sqrt(area / math.pi) * mpp, len(idx), crop,
        (c0, r0, c1 - c0, r1 - r0),
    )


def _missing_core(name: str, r: int, c: int, fit: _Fit, diameter: float, s0: float, mpp: float) -> TmaCore:
    """An empty position: a circle of the grid's diameter (mask px) at the fitted node."""
    radius = diameter / 2
    node = _unrotate(np.array([[fit.cols.pos[c], fit.rows.pos[r]]]), fit.theta)[0]
    x, y = node * s0
    return TmaCore(
        name, r, c, False, (float(x - radius * s0), float(y - radius * s0), 2 * radius * s0, 2 * radius * s0),
        (float(x), float(y)), diameter * mpp, 0,
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
    p, cands, core_area, diameter = analyse(tissue, core_diameter_um)
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
