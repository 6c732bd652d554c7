"""Label map -> valid, gap-free polygons in level-0 pixels (QuPath's frame).

Why it is done this way:

* Polygons are traced along pixel edges with ``rasterio.features.shapes`` (GDAL's polygonizer), never by
  contour following: neighbouring labels then share their borders exactly, and the area of a label's polygon
  equals its pixel count times ``cell**2`` before any simplification.
* Tracing and simplification happen in label-map units (integer coordinates, exact arithmetic); the result is
  scaled and offset to level 0 only at the end.
* Simplification uses ``shapely.coverage_simplify`` on the coverage of all labels at once, so a border shared
  by two labels is simplified once and identically on both sides: no gaps, no overlaps. To make the coverage
  edge-matched (a requirement of coverage simplification), every edge is first split at every pixel corner.
* QuPath (>= 0.6) snaps every coordinate to a 0.01 px grid and rejects the whole file when one geometry is
  invalid after that. Every geometry returned here is already snapped (``shapely.set_precision(g, 0.01)``)
  and checked valid after snapping.

Vertex counts (measured on a 500 x 500-cell, 3-cluster label map of real H&E after
``remove_small_segments(labels, 16)``; 734 polygons): the default (tolerance 1 cell, tissue border kept
exact) gives median 17 and at most ~4,000 vertices per polygon, ~31,600 in all (~0.13 per cell), against
~44,900 for the exact pixel-edge outline; polygonising takes ~0.25 s on one CPU core. Without small-segment
removal the same map has ~13,000 polygons (median 5 vertices) and takes ~1.2 s: remove small segments first.
"""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from rasterio import features as rio_features
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from equiseg_wsi.errors import EquisegError
from equiseg_wsi.export.qupath_check import SNAP_GRID

# Label maps are traced in cell units on purpose (identity transform); GDAL says so when it traces on a thread of
# its own (slides segmented two at a time), which would only puzzle a user. Filtered for rasterio alone.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio")

__all__ = [
    "DEFAULT_SIMPLIFY_TOLERANCE",
    "SNAP_GRID",
    "GridPlacement",
    "PolygonError",
    "cell_coverage",
    "label_map_to_polygons",
    "polygon_vertex_count",
    "remove_small_segments",
    "snap_valid",
    "tissue_outline",
]

#: Default coverage-simplification tolerance, in label-map cells (Visvalingam-Whyatt: roughly the square root
#: of the largest triangle area removed). 1.0 removes the one-cell staircase of oblique borders while areas
#: stay within a fraction of a percent for segments of a few dozen cells or more.
DEFAULT_SIMPLIFY_TOLERANCE = 1.0


class PolygonError(EquisegError, ValueError):
    """A label map or a geometry cannot be turned into QuPath-valid polygons."""


@dataclass(frozen=True)
class GridPlacement:
    """Where a label map lies in the slide, in level-0 pixels of QuPath's frame.

    ``x0, y0``: level-0 coordinates of the label map's top-left corner (any OpenSlide bounds offset already
    subtracted by the caller). ``cell``: side of one label-map pixel in level-0 pixels. Label pixel (r, c)
    covers ``[x0 + c*cell, x0 + (c+1)*cell) x [y0 + r*cell, y0 + (r+1)*cell)``.
    """

    x0: float
    y0: float
    cell: float

    def __post_init__(self) -> None:
        for name in ("x0", "y0", "cell"):
            value = float(getattr(self, name))
            if not np.isfinite(value):
                raise PolygonError(f"GridPlacement.{name} must be finite, got {value!r}")
            object.__setattr__(self, name, value)
        if self.cell <= 0:
            raise PolygonError(f"GridPlacement.cell must be > 0 level-0 px, got {self.cell!r}")

    def to_level0(self, col: float, row: float) -> tuple[float, float]:
        """Level-0 (x, y) of a label-map position given in (column, row) cell units."""
        return self.x0 + col * self.cell, self.y0 + row * self.cell

    def bounds(self, shape: tuple[int, int]) -> tuple[float, float, float, float]:
        """Level-0 (minx, miny, maxx, maxy) of a label map of the given (H, W) shape."""
        h, w = shape
        return self.x0, self.y0, self.x0 + w * self.cell, self.y0 + h * self.cell


Box = tuple[float, float, float, float]  # level-0 (minx, miny, maxx, maxy)


def _overlap_1d(start: float, cell: float, n: int, lo: float, hi: float) -> np.ndarray:
    edges = start + cell * np.arange(n + 1, dtype=np.float64)
    share = np.clip((np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo)) / cell, 0.0, 1.0)
    share[(edges[:-1] >= lo) & (edges[1:] <= hi)] = 1.0  # exactly: whole cells keep integer areas
    return share


def cell_coverage(shape: tuple[int, int], placement: GridPlacement, clip: Box | None) -> np.ndarray:
    """Share of each label cell's area that lies inside `clip` (float64, 1.0 everywhere without a clip).

    Why: a region rarely ends on a cell edge, so its last row and column of cells stick out of the image; the
    exported polygons are clipped to the region (`label_map_to_polygons(clip=...)`) and the areas in the tables
    count each cell by this share, so both agree."""
    h, w = shape
    if clip is None:
        return np.ones((h, w), dtype=np.float64)
    wy = _overlap_1d(placement.y0, placement.cell, h, clip[1], clip[3])
    wx = _overlap_1d(placement.x0, placement.cell, w, clip[0], clip[2])
    return np.outer(wy, wx)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Return ``labels`` as a C-contiguous int32 array after checking shape and range."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise PolygonError(f"label map must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype.kind not in "iub":
        raise PolygonError(f"label map must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise PolygonError("label map values must be 0 (background) or positive int32 cluster ids")
    return np.ascontiguousarray(arr, dtype=np.int32)


# ----------------------------------------------------------------------------------------------------------
# Small segments
# ----------------------------------------------------------------------------------------------------------


def _components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components per label: (component id map, 0 = background; label of each component id),
    numbered as `ndimage.label` numbers each label's components, label by label."""
    from equiseg_wsi.segments_compiled import components  # numba: imported when a merge first runs

    flat = np.ascontiguousarray(labels, dtype=np.int32)
    if flat.size >= 2**31:
        raise PolygonError(f"label map of {flat.shape} cells is too large to merge small segments in")
    comp, comp_label = components(flat, int(flat.max(initial=0)))
    return comp, comp_label


def _adjacency(comp: np.ndarray, n: int) -> list[dict[int, int]]:
    """Shared border length (in cell edges) between every pair of 4-adjacent tissue components."""
    from equiseg_wsi.segments_compiled import border_keys

    keys, counts = np.unique(border_keys(np.ascontiguousarray(comp), n), return_counts=True)
    adj: list[dict[int, int]] = [{} for _ in range(n + 1)]
    for key, cnt in zip(keys.tolist(), counts.tolist(), strict=True):
        i, j = divmod(key, n + 1)
        adj[i][j] = cnt
        adj[j][i] = cnt
    return adj


def remove_small_segments(labels: np.ndarray, min_cells: int) -> np.ndarray:
    """Reassign tissue components smaller than ``min_cells`` cells to their best neighbouring label.

    Components are 4-connected, per label, tissue only. A small component takes the tissue label that shares
    the longest border with it (ties: the smaller label id), merging with those neighbours; the merged region
    is re-examined, smallest first, until nothing small with a tissue neighbour is left. Tissue never becomes
    background and background never becomes tissue, so the tissue coverage keeps no holes and its area is
    unchanged. A small component with no tissue neighbour (an isolated fleck) keeps its label. Deterministic.
    Returns a new int32 array; ``labels`` is not modified.
    """
    arr = _check_labels(labels)
    out: np.ndarray = arr.copy()
    if min_cells <= 1 or not arr.any():
        return out
    comp, comp_label = _components(arr)
    n = len(comp_label) - 1
    sizes = np.bincount(comp.ravel(), minlength=n + 1).astype(np.int64)
    small = np.flatnonzero(sizes[1:] < min_cells) + 1
    if small.size == 0:
        return out

    adj = _adjacency(comp, n)
    parent = np.arange(n + 1, dtype=np.int64)
    label_of = comp_label.copy()
    size_of = sizes.copy()
    heap = [(int(size_of[i]), int(i)) for i in small]
    heapq.heapify(heap)
    while heap:
        size, r = heapq.heappop(heap)
        if parent[r] != r or size_of[r] != size or size >= min_cells or not adj[r]:
            continue  # stale entry, grown big enough, or isolated
        border: dict[int, int] = {}
        for nb, w in adj[r].items():
            lab = int(label_of[nb])
            border[lab] = border.get(lab, 0) + w
        best = min(border, key=lambda lab: (-border[lab], lab))
        group = [r] + [nb for nb in adj[r] if label_of[nb] == best]
        root = max(group[1:], key=lambda g: (len(adj[g]), -g))
        members = set(group)
        for m in group:
            if m == root:
                continue
            for x, w in adj[m].items():
                if x in members:
                    continue
                adj[root][x] = adj[root].get(x, 0) + w
                adj[x][root] = adj[x].get(root, 0) + w
                del adj[x][m]
            adj[m] = {}
            parent[m] = root
            size_of[root] += size_of[m]
        for m in members:
            adj[root].pop(m, None)
        label_of[root] = best
        if size_of[root] < min_cells and adj[root]:
            heapq.heappush(heap, (int(size_of[root]), int(root)))

    # Resolve every component to its final root (path compression by repeated indexing).
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    lut = label_of[parent].astype(np.int32)
    lut[0] = 0
    relabelled: np.ndarray = lut[comp]
    return relabelled


# ----------------------------------------------------------------------------------------------------------
# Polygons
# ----------------------------------------------------------------------------------------------------------


def _polygonal(geom: BaseGeometry) -> MultiPolygon:
    """Keep only the polygonal parts of ``geom`` (make_valid may add lines/points) as one MultiPolygon."""
    parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon")]
    polys: list[Polygon] = []
    for p in parts:
        polys.extend(shapely.get_parts(p) if p.geom_type == "MultiPolygon" else [p])
    polys = [p for p in polys if not p.is_empty]
    return MultiPolygon(polys)


def _as_valid_multipolygon(geom: BaseGeometry) -> MultiPolygon:
    """Make a geometry valid and polygonal, as a MultiPolygon (QuPath rejects invalid geometry)."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    return _polygonal(geom)


def snap_valid(geom: BaseGeometry, grid: float = SNAP_GRID) -> MultiPolygon:
    """Snap a polygonal geometry to QuPath's 0.01 px grid and guarantee it is still valid.

    First rounds every vertex (fast, and what QuPath's reducer does to valid input). If that breaks validity
    (a narrow part collapsing), the topology-preserving snap of ``set_precision`` is used, then ``make_valid``
    as a last resort. Raises ``PolygonError`` if the result still is not valid.
    """
    snapped = _polygonal(shapely.set_precision(geom, grid, mode="pointwise"))
    if not snapped.is_valid:
        try:
            snapped = _polygonal(shapely.set_precision(geom, grid))
        except shapely.errors.GEOSException:  # invalid input: repair first
            pass
    if not snapped.is_valid:
        snapped = _polygonal(shapely.set_precision(_as_valid_multipolygon(geom), grid))
    if not snapped.is_valid:
        reason = shapely.is_valid_reason(snapped)
        raise PolygonError(f"geometry is invalid after snapping to a {grid} px grid: {reason}")
    return snapped


def _trace_cells(labels: np.ndarray) -> dict[int, MultiPolygon]:
    """Trace each label's 4-connected components along pixel edges, in cell units (exact integers)."""
    parts: dict[int, list[Polygon]] = {}
    shapes = rio_features.shapes(labels, mask=labels > 0, connectivity=4, transform=Affine.identity())
    for geojson_geom, value in shapes:
        lab = int(value)
        rings: list[Any] = [shapely.linearrings(np.asarray(r, dtype=np.float64)) for r in geojson_geom["coordinates"]]
        parts.setdefault(lab, []).append(shapely.polygons(rings[0], holes=rings[1:] or None))
    return {lab: _as_valid_multipolygon(MultiPolygon(polys)) for lab, polys in sorted(parts.items())}


def _simplify_coverage(
    cover: dict[int, MultiPolygon], tolerance: float, simplify_boundary: bool
) -> dict[int, MultiPolygon]:
    """Simplify all labels together so shared borders stay shared (no gaps, no overlaps)."""
    if not cover:
        return {}
    keys = list(cover)
    geoms = np.array([cover[k] for k in keys], dtype=object)
    # Edge-match the coverage: every junction lies on a pixel corner, so a vertex at every corner makes shared
    # edges vertex-identical on both sides, as coverage simplification requires.
    geoms = shapely.segmentize(geoms, 1.0)
    # Tolerance 0 means "exact": on the integer grid every non-collinear vertex spans a triangle of area
    # >= 0.5, so a tiny tolerance drops only collinear vertices, and still keeps the coverage edge-matched.
    geoms = shapely.coverage_simplify(geoms, 1e-3, simplify_boundary=True)
    if tolerance > 0:
        geoms = shapely.coverage_simplify(geoms, tolerance, simplify_boundary=simplify_boundary)
    return {k: _as_valid_multipolygon(g) for k, g in zip(keys, geoms, strict=True)}


def _to_level0(geoms: dict[int, MultiPolygon], placement: GridPlacement) -> dict[int, MultiPolygon]:
    """Scale cell coordinates to level-0 pixels and add the placement offset."""
    cell, x0, y0 = placement.cell, placement.x0, placement.y0
    offset = np.array([x0, y0])

    def affine(coords: np.ndarray) -> np.ndarray:
        moved: np.ndarray = coords * cell + offset
        return moved

    return {k: shapely.transform(g, affine) for k, g in geoms.items()}


def _cell_polygons(
    labels: np.ndarray, simplify_tolerance: float, simplify_boundary: bool = False
) -> dict[int, MultiPolygon]:
    """Traced (and possibly simplified) coverage in cell units, before scaling and snapping."""
    if simplify_tolerance is None or not np.isfinite(simplify_tolerance) or simplify_tolerance < 0:
        raise PolygonError(f"simplify_tolerance must be a finite number >= 0 cells, got {simplify_tolerance!r}")
    traced = _trace_cells(labels)
    if simplify_tolerance == 0:  # GDAL's outlines have no collinear vertices: nothing to simplify
        return traced
    return _simplify_coverage(traced, float(simplify_tolerance), simplify_boundary)


def label_map_to_polygons(
    labels: np.ndarray,
    placement: GridPlacement,
    simplify_tolerance: float = DEFAULT_SIMPLIFY_TOLERANCE,
    *,
    simplify_boundary: bool = False,
    snap: bool = True,
    clip: Box | None = None,
) -> dict[int, MultiPolygon]:
    """One MultiPolygon per label present (0 excluded), in level-0 pixels, valid after QuPath's snapping.

    ``simplify_tolerance`` is in label-map cells (Visvalingam-Whyatt, roughly sqrt of the triangle area
    removed); ``0`` keeps the exact pixel-edge outline and only drops collinear vertices. Values below about
    0.7 cells behave like 0 (a one-cell staircase step is a triangle of area 0.5). By default only borders
    between labels are simplified and the tissue/background border stays exact: simplifying it biases the
    tissue area outwards by about 1% on real tissue, so ``simplify_boundary=True`` trades area accuracy for
    about 40% fewer vertices. Run ``remove_small_segments`` first: one-cell fragments lose up to half their
    area when simplified. Holes are interior rings. ``snap=False`` returns the unsnapped geometries (exact
    areas, for tests); keep the default for export. Keys are the sorted label ids. ``clip`` (level-0 minx, miny,
    maxx, maxy, in the placement's frame) cuts every segment to that box, e.g. the region inside the image; with
    a tolerance of 0 each segment's area is then ``cell_coverage`` summed over its cells, times ``cell**2``.
    """
    arr = _check_labels(labels)
    cells = _cell_polygons(arr, simplify_tolerance, simplify_boundary)
    exact = {k for k, g in cells.items() if _exact_copy(g, placement)}
    cover = _to_level0(cells, placement)
    if clip is not None:
        box = shapely.box(*clip)
        cut = {k for k, g in cover.items() if not box.covers(g)}
        cover = {k: _polygonal(shapely.intersection(g, box)) if k in cut else g for k, g in cover.items()}
        cover = {k: g for k, g in cover.items() if not g.is_empty}
        exact -= cut
    if not snap:
        return cover
    return {k: g if k in exact else snap_valid(g) for k, g in cover.items()}


def _exact_copy(cells: BaseGeometry, placement: GridPlacement) -> bool:
    """Whether the level-0 copy of a valid geometry in cell units is exact and already on QuPath's grid: integer
    vertices, an integer cell side and offset make every level-0 vertex an exact integer (so snapping moves none
    and the copy is as valid as the geometry traced), and spares a second validity check per segment."""
    if not all(float(v).is_integer() and abs(v) < 2**40 for v in (placement.cell, placement.x0, placement.y0)):
        return False
    coords = shapely.get_coordinates(cells)
    return bool(np.all(coords == np.round(coords)) and np.all(np.abs(coords) < 2**40))


def tissue_outline(
    labels: np.ndarray,
    placement: GridPlacement,
    simplify_tolerance: float = DEFAULT_SIMPLIFY_TOLERANCE,
    *,
    simplify_boundary: bool = False,
    polygons: Mapping[int, BaseGeometry] | None = None,
    clip: Box | None = None,
) -> MultiPolygon:
    """The region outline: the union of all segments, consistent with ``label_map_to_polygons``.

    Pass ``polygons`` (the result of ``label_map_to_polygons`` with the same arguments) to avoid tracing
    twice; otherwise they are computed here. The segments form an exact coverage, so the fast coverage
    union is used; should it disagree with the segments (area or validity), a robust overlay union on the
    0.01 px grid is used instead. Empty MultiPolygon when there is no tissue. With a tolerance of 0 the outline is
    traced from the tissue cells themselves (the exact union of the exact segments; `clip` as for the segments).
    """
    if simplify_tolerance == 0:
        outline = label_map_to_polygons((_check_labels(labels) > 0).astype(np.int32), placement, 0, clip=clip)
        return outline.get(1, MultiPolygon())
    if polygons is None:
        polygons = label_map_to_polygons(labels, placement, simplify_tolerance, simplify_boundary=simplify_boundary,
                                         clip=clip)
    parts = [g for g in polygons.values() if not g.is_empty]
    if not parts:
        return MultiPolygon()
    total = sum(g.area for g in parts)
    try:
        union = _polygonal(shapely.coverage_union_all(parts))
    except shapely.errors.GEOSException:
        union = MultiPolygon()
    if not union.is_valid or abs(union.area - total) > 1e-9 * max(total, 1.0) + SNAP_GRID**2:
        union = _polygonal(shapely.union_all(parts, grid_size=SNAP_GRID))
    return snap_valid(union)


def polygon_vertex_count(geom: BaseGeometry) -> int:
    """Number of coordinates QuPath will hold for this geometry (closing vertices included)."""
    return int(shapely.get_num_coordinates(geom))
