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
   half a spacing (the grid grows by a row/column if a sizeable candidate lies one spacing beyond it); pieces
   in no candidate (sparse patches, crumbs) go to the nearest node if its expected circle holds their centroid.
6. **Presence**: a position is present when its tissue inside the *expected circle* (the punch at the fitted
   node, radius widened by 15% for placement error) covers at least 15% of a punch's area; debris near an
   empty position does not, a sparse core does. A missing core's centre is the fitted node.
7. **Centre**: a whole core's centre is its tissue centroid; a partly filled one (half-moon, cut, sparse: its
   centroid lies off the punch) is centred on its punch circle, fitted to the rim of its tissue and held to the
   grid node (`equiseg_wsi.tma_centre`); its box is the punch circle's.

Steps 1-3 are in `equiseg_wsi.tma_candidates`, step 4 in `equiseg_wsi.tma_grid`, the punch fit of step 7 in
`equiseg_wsi.tma_centre`. Coordinates returned are level-0 px of the slide (x right, y down); `rotation_deg` is
the angle of the rows to the image x axis, positive when rows descend to the right (clockwise on screen).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from equiseg_wsi.errors import InputError, NoTissueError
from equiseg_wsi.export.qptma import QptmaCore, expand_labels, qupath_core_name
from equiseg_wsi.tma_candidates import MIN_PIECE, Candidate, Pieces, analyse
from equiseg_wsi.tma_centre import fit_punch
from equiseg_wsi.tma_grid import Fit, extend, fit_grid, place, rotate, unrotate

if TYPE_CHECKING:
    from equiseg_wsi.slide import Slide
    from equiseg_wsi.tissue import TissueMap

__all__ = ["NotTmaError", "TmaCore", "TmaGrid", "dearray", "dearray_slide", "is_tma", "tma_problem"]

log = logging.getLogger(__name__)

# Candidates that may extend the grid beyond the well-formed cores must be at least this big.
MIN_EXTENDING = 0.35
# The expected circle of a position: the punch at the fitted node, its radius widened by this factor for the
# arrayer's placement error (real punches sit within a few % of the node; the test slides jitter up to 15%).
EXPECTED_RADIUS = 1.15
# A position is present when its tissue in the expected circle covers at least this share of a punch's area
# (debris is at most a few %, a sparse core 30% and more).
PRESENT_MIN = 0.15


class NotTmaError(InputError):
    """A slide given to be dearrayed does not look like a TMA (see `tma_problem`)."""


@dataclass(frozen=True)
class TmaCore:
    """One grid position. Boxes and centres in level-0 px; `row`/`col` 0-based; `fragments` = tissue pieces.

    For a missing core, `bbox_level0` is the expected box (a circle of the grid's diameter at the fitted node),
    which QuPath's ``.qptma`` reader requires for every position. `partial`: the tissue fills only part of the
    punch (half-moon, cut, sparse); its centre and box are then the punch circle's (which also contains all of
    its tissue) and `diameter_um` is the punch's; for a whole core they are its tissue's centroid, box and
    equivalent diameter.
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
    partial: bool = False


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
    fit = fit_grid(xy, diameter)
    if not fit.valid.any():
        raise NoTissueError("no TMA grid found: the core candidates do not line up in rows and columns")

    assigned = _assign(cands, fit, core_area)
    n_rows, n_cols = fit.rows.pos.size, fit.cols.pos.size
    rl = _labels(row_labels, n_rows, "letters", "row")
    cl = _labels(col_labels, n_cols, "numbers", "column")
    s0, mpp = tissue.px_level0, tissue.mpp
    radius = diameter / 2
    spacing = min(fit.cols.spacing, fit.rows.spacing) if n_rows > 1 and n_cols > 1 else max(
        fit.cols.spacing, fit.rows.spacing)
    expected = EXPECTED_RADIUS * radius
    pieces = _node_pieces(p, assigned, fit, expected)
    cores: list[TmaCore] = []
    for r in range(n_rows):
        for c in range(n_cols):
            name = qupath_core_name(r, c, rl, cl, row_first=row_first)
            idx = pieces.get((r, c), [])
            node = _node(fit, r, c)
            if idx and _inside(p, idx, node, expected) >= PRESENT_MIN * math.pi * radius**2:
                cores.append(_present_core(name, r, c, idx, p, s0, mpp, node, radius, spacing))
            else:
                cores.append(_missing_core(name, r, c, fit, diameter, s0, mpp))
    su, sv = fit.cols.spacing * mpp, fit.rows.spacing * mpp
    return TmaGrid(
        n_rows=n_rows, n_cols=n_cols, rotation_deg=math.degrees(fit.theta), spacing_um=(su + sv) / 2,
        diameter_um=diameter * mpp, cores=cores, spacing_xy_um=(su, sv), row_labels=rl, col_labels=cl,
        row_first=row_first, mask_shape=tuple(tissue.mask.shape), mask_mpp=mpp, px_level0=s0,
    )


def _assign(cands: list[Candidate], fit: Fit, core_area: float) -> dict[tuple[int, int], list[Candidate]]:
    """Candidates (well-formed or not) by grid node (row, col), largest first; sizeable ones may grow `fit`."""
    assigned: dict[tuple[int, int], list[Candidate]] = {}
    for cand in sorted(cands, key=lambda c: -c.area):
        u, v = rotate(np.array([[cand.cx, cand.cy]]), fit.theta)[0]
        may_extend = cand.area >= MIN_EXTENDING * core_area
        col = place(u, fit.cols, may_extend)
        row = place(v, fit.rows, may_extend)
        if col is None or row is None:
            continue
        if col < 0 or col >= fit.cols.pos.size:
            extend(fit.cols, col)
            if col < 0:
                assigned = {(r, cc - col): v_ for (r, cc), v_ in assigned.items()}
                col = 0
        if row < 0 or row >= fit.rows.pos.size:
            extend(fit.rows, row)
            if row < 0:
                assigned = {(r - row, cc): v_ for (r, cc), v_ in assigned.items()}
                row = 0
        assigned.setdefault((row, col), []).append(cand)
    return assigned


def _node(fit: Fit, r: int, c: int) -> tuple[float, float]:
    """The fitted grid position (row r, column c) in mask px (x, y)."""
    x, y = unrotate(np.array([[fit.cols.pos[c], fit.rows.pos[r]]]), fit.theta)[0]
    return float(x), float(y)


def _node_pieces(
    p: Pieces, assigned: dict[tuple[int, int], list[Candidate]], fit: Fit, radius: float,
) -> dict[tuple[int, int], list[int]]:
    """Piece indices per grid node: its candidates' pieces, plus pieces in no candidate whose centroid lies
    within `radius` of the node (patches of a sparse core, crumbs of a core too small to be fragments)."""
    out = {key: sorted(i for g in group for i in g.pieces) for key, group in assigned.items()}
    taken = {i for idx in out.values() for i in idx}
    free = np.array([i for i in range(p.area.size) if i not in taken and p.area[i] > 0], dtype=np.int64)
    if free.size == 0 or fit.cols.pos.size == 0 or fit.rows.pos.size == 0:
        return out
    uv = rotate(np.stack([p.cx[free], p.cy[free]], axis=1), fit.theta)
    col = np.abs(uv[:, :1] - fit.cols.pos[None, :]).argmin(axis=1)
    row = np.abs(uv[:, 1:] - fit.rows.pos[None, :]).argmin(axis=1)
    dist = np.hypot(uv[:, 0] - fit.cols.pos[col], uv[:, 1] - fit.rows.pos[row])
    for i, r, c, d in zip(free, row, col, dist, strict=True):
        if d <= radius:
            out.setdefault((int(r), int(c)), []).append(int(i))
    return {key: sorted(v) for key, v in out.items()}


def _inside(p: Pieces, idx: list[int], node: tuple[float, float], radius: float) -> float:
    """Pixels of pieces `idx` whose centre lies within `radius` of `node` (x, y), all in mask px."""
    h, w = p.labels.shape
    x, y = node
    r0, r1 = max(0, int(math.floor(y - radius))), min(h, int(math.ceil(y + radius)) + 1)
    c0, c1 = max(0, int(math.floor(x - radius))), min(w, int(math.ceil(x + radius)) + 1)
    if r1 <= r0 or c1 <= c0:
        return 0.0
    yy, xx = np.mgrid[r0:r1, c0:c1]
    near = np.hypot(xx + 0.5 - x, yy + 0.5 - y) <= radius
    return float((near & np.isin(p.labels[r0:r1, c0:c1], np.asarray(idx) + 1)).sum())


def _present_core(
    name: str, r: int, c: int, idx: list[int], p: Pieces, s0: float, mpp: float, node: tuple[float, float],
    radius: float, spacing: float,
) -> TmaCore:
    """The core made of pieces `idx` (`s0`: level-0 px per mask px, `mpp`: µm per mask px; `node`, `radius`,
    `spacing`: the fitted grid position, punch radius and spacing in mask px)."""
    area = float(p.area[idx].sum())
    cy = float((p.cy[idx] * p.area[idx]).sum() / area)
    cx = float((p.cx[idx] * p.area[idx]).sum() / area)
    r0, c0 = (int(v) for v in p.box[idx, :2].min(axis=0))
    r1, c1 = (int(v) for v in p.box[idx, 2:].max(axis=0))
    crop = np.isin(p.labels[r0:r1, c0:c1], np.asarray(idx) + 1)
    box = (float(c0), float(r0), float(c1), float(r1))
    diameter_um = 2 * math.sqrt(area / math.pi) * mpp
    punch = fit_punch(crop, (r0, c0), (cx, cy), node, radius, spacing)
    if punch.partial:  # centre and box of the punch circle (widened to keep all of the tissue)
        cx, cy, pr = punch.x, punch.y, punch.radius
        box = (min(box[0], cx - pr), min(box[1], cy - pr), max(box[2], cx + pr), max(box[3], cy + pr))
        diameter_um = 2 * pr * mpp
    return TmaCore(
        name, r, c, True,
        (box[0] * s0, box[1] * s0, (box[2] - box[0]) * s0, (box[3] - box[1]) * s0),
        (cx * s0, cy * s0), diameter_um, len(idx), crop, (c0, r0, c1 - c0, r1 - r0), punch.partial,
    )


def _missing_core(name: str, r: int, c: int, fit: Fit, diameter: float, s0: float, mpp: float) -> TmaCore:
    """An empty position: a circle of the grid's diameter (mask px) at the fitted node."""
    radius = diameter / 2
    node = unrotate(np.array([[fit.cols.pos[c], fit.rows.pos[r]]]), fit.theta)[0]
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
    require_tma: bool = True,
) -> tuple[TmaGrid, TissueMap]:
    """Detect tissue at `tissue_mpp` µm/px and dearray it; returns the grid and the tissue map it used.

    A slide that does not look like a TMA (`tma_problem`: e.g. one tissue section, which would give a 1 x 1
    "grid") raises `NotTmaError`; with `require_tma=False` it is dearrayed anyway and a warning is logged.
    """
    from equiseg_wsi.tissue import detect_tissue

    tissue = detect_tissue(slide, tissue_mpp)
    grid = dearray(tissue, core_diameter_um=core_diameter_um, row_labels=row_labels, col_labels=col_labels,
                   row_first=row_first)
    problem = tma_problem(tissue, core_diameter_um=core_diameter_um)
    if problem is not None:
        if require_tma:
            raise NotTmaError(f"does not look like a TMA: {problem}")
        log.warning("%s does not look like a TMA: %s; dearrayed anyway as a %d x %d grid, %d cores present",
                    slide.path, problem, grid.n_cols, grid.n_rows, len(grid.present))
    return grid, tissue


def is_tma(tissue: TissueMap, *, core_diameter_um: float | None = None) -> bool:
    """True when the tissue looks like a TMA: >= 4 similar, round pieces on a lattice holding most tissue.

    For the runner's auto-detection: a whole-slide section, a few biopsies or scattered debris are not TMAs.
    """
    return tma_problem(tissue, core_diameter_um=core_diameter_um) is None


def tma_problem(tissue: TissueMap, *, core_diameter_um: float | None = None) -> str | None:
    """Why the tissue does not look like a TMA (one line, for a message), or None when it does (`is_tma`)."""
    p, cands, core_area, diameter = analyse(tissue, core_diameter_um)
    good = [c for c in cands if c.good]
    if len(good) < 4:
        return (f"{len(good)} round, core-sized tissue piece{'s' if len(good) != 1 else ''}, "
                "a TMA has at least 4 on a grid")
    areas = np.array([c.area for c in good])
    if float(areas.std() / areas.mean()) > 0.4:
        return f"its round tissue pieces differ too much in size, spread {areas.std() / areas.mean():.0%} of the mean"
    # Most tissue (ignoring dust below a core's 2%) must be in core candidates.
    total = float(p.area[p.area >= MIN_PIECE * core_area].sum())
    in_cores = sum(c.area for c in cands)
    if in_cores < 0.6 * total:
        return f"only {in_cores / total:.0%} of its tissue is in core-like pieces, a TMA has most of it in cores"
    xy = np.array([(c.cx, c.cy) for c in good])
    fit = fit_grid(xy, diameter)
    n_nodes = fit.rows.pos.size * fit.cols.pos.size
    spacing = min(fit.rows.spacing, fit.cols.spacing) if fit.rows.pos.size > 1 else fit.cols.spacing
    on_grid = int(fit.valid.sum())
    if not (on_grid >= 4 and fit.valid.mean() >= 0.75 and n_nodes >= 4 and on_grid >= 0.3 * n_nodes):
        return f"its core-like pieces do not line up in rows and columns, {on_grid} of {len(good)} on a grid"
    if not 0.9 * diameter <= spacing <= 4 * diameter:
        return f"its core-like pieces are {spacing / diameter:.1f} diameters apart, a TMA grid 0.9 to 4"
    return None
