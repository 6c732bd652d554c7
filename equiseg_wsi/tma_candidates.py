"""Core candidates of a TMA tissue mask: the first steps of dearraying (pieces, core size, fragments).

Split from the grid fitting in `equiseg_wsi.tma`, which describes all steps; everything here is in mask px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from equiseg_wsi.errors import InputError

if TYPE_CHECKING:
    from equiseg_wsi.tissue import TissueMap

__all__ = ["MIN_PIECE", "Candidate", "Pieces", "analyse"]

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
# Erosion depths (share of the diameter) tried, in order, to split touching cores at their neck.
SPLIT_DEPTHS = (0.2, 0.27, 0.34)


@dataclass
class Pieces:
    """Connected tissue pieces of a mask: label image and per-piece area, centroid and box (mask px)."""

    labels: np.ndarray
    area: np.ndarray  # px, index = label - 1
    cy: np.ndarray
    cx: np.ndarray
    box: np.ndarray  # (n, 4) row0, col0, row1, col1 (exclusive)


def _pieces(labels: np.ndarray, n: int) -> Pieces:
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
    return Pieces(labels, area, cy, cx, box)


def _split_fused(p: Pieces, core_area: float, diameter: float) -> Pieces:
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


def _core_area(p: Pieces) -> float:
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
    pts: np.ndarray = np.argwhere(edge).astype(np.float64) + (r0, c0)
    return pts


def _join_fragments(p: Pieces, keep: np.ndarray, core_area: float, diameter: float) -> list[list[int]]:
    """Groups of piece indices (0-based) that form one core each; every kept piece is in exactly one group."""
    from scipy.spatial import cKDTree  # here: only TMA slides need it (0.2 s of start-up)

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
        gap = float(np.min(dist)) - 1.0  # adjacent boundary pixels across a 1 px gap are 2 px apart
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
class Candidate:
    """A possible core: joined pieces (0-based indices), area, centroid, box; `good` = round and core-sized."""

    pieces: list[int]
    area: float
    cy: float
    cx: float
    box: np.ndarray  # row0, col0, row1, col1
    good: bool


def _candidates(p: Pieces, core_area: float, diameter: float) -> list[Candidate]:
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
        out.append(Candidate(sorted(group), area, cy, cx, box, bool(good)))
    return out


def analyse(tissue: TissueMap, core_diameter_um: float | None) -> tuple[Pieces, list[Candidate], float, float]:
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
