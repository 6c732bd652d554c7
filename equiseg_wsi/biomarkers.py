"""Per-region imaging biomarkers measured on a label map, and their CSV table.

Why these numbers: they summarise a segmentation in units a pathologist can use (µm, µm², fractions) and are
what the rotation protocol checks for stability. All values are finite; a cluster absent from a
region gets 0 for every column, including those that are undefined for an empty cluster (mean component
area, fragmentation, mean colour, mean OD) — read ``c{i}_area_um2 > 0`` before interpreting those. The one
row with empty measurements is that of a missing TMA core (``present`` False, `missing_region_row`).

Conventions: label 0 is background / not tissue, 1..K are clusters in canonical order. Connected components
use 4-connectivity (pixels sharing an edge), matching the pixel-edge polygons exported to QuPath. Perimeters
count pixel edges; the image border counts as background.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cluster import OD_TABLE
from .errors import InputError
from .export.table import write_table

__all__ = [
    "COLUMN_DOCS",
    "IDENTITY_COLUMNS",
    "biomarker_columns",
    "biomarker_deltas",
    "column_docs",
    "compute_biomarkers",
    "format_value",
    "is_measured",
    "missing_region_row",
    "segment_measurements",
    "write_csv",
]

IDENTITY_COLUMNS: tuple[str, ...] = (
    "slide", "region", "grid_row", "grid_column", "present", "source_path", "case_id",
)

_PER_CLUSTER: tuple[str, ...] = (
    "area_um2",
    "fraction",
    "n_components",
    "mean_component_area_um2",
    "perimeter_um",
    "fragmentation",
    "mean_r",
    "mean_g",
    "mean_b",
    "mean_od",
)

#: Documentation of every column; ``{i}``/``{j}`` stand for cluster numbers 1..K (i < j).
COLUMN_DOCS: dict[str, str] = {
    "slide": "Slide name (file stem or manifest 'slide').",
    "region": "Core or tissue-region name (QuPath TMA style 'A-1' for a grid core).",
    "grid_row": "TMA grid row (1-based; empty when the region is not part of a grid).",
    "grid_column": "TMA grid column (1-based; empty when the region is not part of a grid).",
    "present": (
        "True for a measured region; False for a TMA grid position without a core (missing), whose "
        "measurement columns are all empty."
    ),
    "source_path": "Path of the input image or slide.",
    "case_id": "Case / patient id from the manifest (empty when not given).",
    "n_clusters": "Number of clusters K of the segmentation.",
    "cell_size_um": "Side of one label-map cell in µm (a cell covers cell_size_um² µm²).",
    "tissue_area_um2": ("Tissue area (all cells with a cluster label, cut to the region inside the image) in µm²: "
                        "the area of the GeoJSON segments."),
    "entropy_bits": "Shannon entropy of the cluster fractions in bits (0 = one cluster; log2 K = all equal).",
    "c{i}_area_um2": ("Area of cluster i in µm² (cells at the image edge count by their part inside, as the clipped "
                      "polygons do)."),
    "c{i}_fraction": "Fraction of the tissue area in cluster i (the K fractions sum to 1; 0 without tissue).",
    "c{i}_n_components": "Number of 4-connected pieces of cluster i.",
    "c{i}_mean_component_area_um2": "Mean area of a piece of cluster i in µm² (0 when absent).",
    "c{i}_perimeter_um": (
        "Length in µm of the pixel edges between cluster i and anything else "
        "(other clusters, background, image border)."
    ),
    "c{i}_fragmentation": (
        "perimeter² / area of cluster i (dimensionless; 16 for one square, larger when ragged or "
        "scattered; 0 when absent)."
    ),
    "c{i}_mean_r": "Mean red value (0-255) of the image over cluster i (0 when absent).",
    "c{i}_mean_g": "Mean green value (0-255) of the image over cluster i (0 when absent).",
    "c{i}_mean_b": "Mean blue value (0-255) of the image over cluster i (0 when absent).",
    "c{i}_mean_od": (
        "Mean optical density of cluster i: per-pixel mean over R,G,B of -log10((I+1)/256), averaged "
        "over the cluster (0 = white; cluster 1 is the darkest; 0 when absent)."
    ),
    "boundary_{i}_{j}_fraction": (
        "Shared boundary length between clusters i and j divided by the total boundary length between "
        "different clusters (all pairs sum to 1; all 0 when no two clusters touch)."
    ),
}


def biomarker_columns(k: int) -> list[str]:
    """Column names, in CSV order, of :func:`compute_biomarkers` for K clusters."""
    cols = [*IDENTITY_COLUMNS, "n_clusters", "cell_size_um", "tissue_area_um2", "entropy_bits"]
    for i in range(1, k + 1):
        cols += [f"c{i}_{name}" for name in _PER_CLUSTER]
    cols += [f"boundary_{i}_{j}_fraction" for i in range(1, k + 1) for j in range(i + 1, k + 1)]
    return cols


def column_docs(k: int) -> dict[str, str]:
    """Every column of :func:`biomarker_columns` with its explanation, for the README."""
    out = {}
    for col in biomarker_columns(k):
        if col in COLUMN_DOCS:
            out[col] = COLUMN_DOCS[col]
        elif col.startswith("boundary_"):
            _, i, j, _ = col.split("_")
            out[col] = COLUMN_DOCS["boundary_{i}_{j}_fraction"].replace("clusters i and j", f"clusters {i} and {j}")
        else:
            head, _, rest = col.partition("_")
            i = head[1:]
            out[col] = COLUMN_DOCS["c{i}_" + rest].replace("cluster i", f"cluster {i}")
    return out


# ------------------------------------------------------------------------------------------ measuring


def _check_labels(labels: np.ndarray, k: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise InputError(f"label map must be 2-D (h, w), got shape {lab.shape}")
    if lab.dtype.kind not in "iu":
        raise InputError(f"label map must hold integers, got {lab.dtype}")
    if k < 1:
        raise InputError(f"number of clusters must be >= 1, got {k}")
    if lab.size and (lab.min() < 0 or lab.max() > k):
        raise InputError(f"label values must lie in 0..{k}, found {lab.min()}..{lab.max()}")
    return np.ascontiguousarray(lab, dtype=np.int32)  # the compiled passes' label type


def _check_cell(cell_um: float) -> float:
    c = float(cell_um)
    if not math.isfinite(c) or c <= 0:
        raise InputError(f"cell size must be a positive number of µm, got {cell_um!r}")
    return c


def _components(lab: np.ndarray, k: int) -> np.ndarray:
    """4-connected component count per label 0..K (index 0 unused)."""
    from equiseg_wsi.segments_compiled import components  # numba: imported when a table is first measured

    _, comp_label = components(lab, k)
    out: np.ndarray = np.bincount(comp_label[1:], minlength=k + 1)
    return out


def _coverage(coverage: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if coverage is None:
        return None
    cov = np.asarray(coverage, dtype=np.float64)
    if cov.shape != shape or not np.all((cov >= 0) & (cov <= 1)):
        raise InputError(f"cell coverage must be shares in 0..1 of the label map's shape {shape}, got {cov.shape}")
    return cov.ravel()


def segment_measurements(
    labels: np.ndarray, k: int, cell_um: float, coverage: np.ndarray | None = None
) -> dict[int, dict[str, float]]:
    """Per cluster 1..K the QuPath measurements of its segment: flat ``{name: finite float}``.

    Names: ``area_um2``, ``fraction_of_region`` (of the region's tissue), ``n_components``. Absent clusters
    get zeros, so every cluster has the same keys. ``coverage`` (see `compute_biomarkers`) weighs cell areas.
    """
    lab = _check_labels(labels, k)
    cell = _check_cell(cell_um)
    counts = np.bincount(lab.ravel(), weights=_coverage(coverage, lab.shape), minlength=k + 1)
    tissue = float(counts[1:].sum())
    comps = _components(lab, k)
    out: dict[int, dict[str, float]] = {}
    for i in range(1, k + 1):
        out[i] = {
            "area_um2": float(counts[i] * cell * cell),
            "fraction_of_region": float(counts[i] / tissue) if tissue else 0.0,
            "n_components": float(comps[i]),
        }
    return out


def _mean(total: float, n: float) -> float:
    """Mean of values of total weight ``n`` summing to ``total``; 0 for an empty cluster (keeps CSVs finite)."""
    return float(total / n) if n > 0 else 0.0


def _identity_values(identity: Mapping[str, Any]) -> dict[str, Any]:
    ident = dict(identity)
    if "core" in ident and "region" not in ident:  # the original method's word for a region
        ident["region"] = ident.pop("core")
    unknown = set(ident) - set(IDENTITY_COLUMNS)
    if unknown:
        raise InputError(
            f"unknown identity keys {sorted(unknown)}; allowed: {', '.join(IDENTITY_COLUMNS)} (and 'core')"
        )
    out: dict[str, Any] = {}
    for col in IDENTITY_COLUMNS:
        v = ident.get(col)
        if col == "present":  # a measured region is present unless said otherwise
            out[col] = str(bool(True if v is None else v))
        elif v is None:
            out[col] = ""
        elif isinstance(v, (bool, np.bool_)):
            out[col] = str(bool(v))
        elif isinstance(v, (int, np.integer)):
            out[col] = int(v)
        else:
            out[col] = str(v)
    return out


def compute_biomarkers(
    labels: np.ndarray,
    rgb: np.ndarray,
    k: int,
    cell_um: float,
    identity: Mapping[str, Any],
    coverage: np.ndarray | None = None,
) -> dict[str, Any]:
    """One CSV row for one region: identity columns, then the biomarkers of :data:`COLUMN_DOCS`.

    ``labels`` (h, w) int with 0 = background and 1..K clusters; ``rgb`` (h, w, 3) uint8 on the same grid;
    ``cell_um`` the side of a label cell in µm; ``identity`` with keys among :data:`IDENTITY_COLUMNS`
    (missing ones are written empty). ``coverage`` (h, w): the share of each cell inside the region
    (`polygons.cell_coverage`; cells sticking out of the image count by their part inside), so that areas and
    fractions equal those of the clipped polygons; means are weighted the same way. Returns an ordered dict in
    :func:`biomarker_columns` order.
    """
    lab = _check_labels(labels, k)
    cell = _check_cell(cell_um)
    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[:2] != lab.shape or img.shape[2] < 3:
        raise InputError(f"image of shape {img.shape} does not match label map {lab.shape} (need (h, w, 3))")
    img = img[..., :3]
    area_px = cell * cell

    flat = lab.ravel()
    cov = _coverage(coverage, lab.shape)
    weight = np.ones(flat.size) if cov is None else cov
    from equiseg_wsi.measure_compiled import cluster_sums, edge_counts

    sums = cluster_sums(flat, np.ascontiguousarray(img).reshape(-1, 3), np.ascontiguousarray(weight, np.float64),
                        OD_TABLE, k)  # np.bincount's sums, bit for bit, in one pass
    counts, colour_sums, od_sums = sums[0], sums[1:4], sums[4]
    tissue = float(counts[1:].sum())
    fractions = counts[1:] / tissue if tissue else np.zeros(k)
    comps = _components(lab, k)
    per_edges, pair_edges = edge_counts(lab, k)

    row: dict[str, Any] = _identity_values(identity)
    row["n_clusters"] = int(k)
    row["cell_size_um"] = cell
    row["tissue_area_um2"] = float(tissue * area_px)
    nz = fractions[fractions > 0]
    row["entropy_bits"] = float(-(nz * np.log2(nz)).sum()) + 0.0 if nz.size else 0.0

    for i in range(1, k + 1):
        n = float(counts[i])  # cells, each counted by its share inside the region
        area = n * area_px
        perim = float(per_edges[i] * cell)
        row[f"c{i}_area_um2"] = float(area)
        row[f"c{i}_fraction"] = float(fractions[i - 1])
        row[f"c{i}_n_components"] = int(comps[i])
        row[f"c{i}_mean_component_area_um2"] = float(area / comps[i]) if comps[i] else 0.0
        row[f"c{i}_perimeter_um"] = perim
        row[f"c{i}_fragmentation"] = float(perim * perim / area) if n > 0 else 0.0
        row[f"c{i}_mean_r"] = _mean(colour_sums[0][i], n)
        row[f"c{i}_mean_g"] = _mean(colour_sums[1][i], n)
        row[f"c{i}_mean_b"] = _mean(colour_sums[2][i], n)
        row[f"c{i}_mean_od"] = _mean(od_sums[i], n)

    total_pairs = int(np.triu(pair_edges[1:, 1:], 1).sum())
    for i in range(1, k + 1):
        for j in range(i + 1, k + 1):
            row[f"boundary_{i}_{j}_fraction"] = float(pair_edges[i, j] / total_pairs) if total_pairs else 0.0
    return row


def missing_region_row(like: Mapping[str, Any], identity: Mapping[str, Any]) -> dict[str, Any]:
    """The row of a TMA grid position without a core: the columns of `like` (a measured row), its identity
    from `identity` with ``present`` False, ``n_clusters`` as in `like`, every measurement empty (None)."""
    ident = _identity_values({**identity, "present": False})
    row: dict[str, Any] = {}
    for col in like:
        if col in ident:
            row[col] = ident[col]
        elif col == "n_clusters":
            row[col] = like[col]
        else:
            row[col] = None
    return row


def is_measured(row: Mapping[str, Any]) -> bool:
    """False for the row of a missing TMA core (`missing_region_row`), True for a measured region."""
    return str(row.get("present", "True")) != "False"


# ------------------------------------------------------------------------------------ rotation helper


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


_NOT_BIOMARKERS = frozenset((*IDENTITY_COLUMNS, "n_clusters", "cell_size_um"))


def biomarker_deltas(rows_by_angle: Mapping[float, Mapping[str, Any]]) -> dict[str, float]:
    """How much each numeric biomarker moves under rotation.

    ``rows_by_angle`` maps angle in degrees (must include 0) to a :func:`compute_biomarkers` row. For every
    numeric biomarker column ``X`` (identity, ``n_clusters`` and ``cell_size_um`` skipped) returns
    ``X_max_abs_delta`` = max over angles of |X(θ) - X(0)| and ``X_cv`` = population standard deviation
    over all angles / |mean| (0 when the mean is 0, e.g. an absent cluster), in column order.
    """
    if not rows_by_angle:
        raise InputError("no biomarker rows given")
    ref_key = next((a for a in rows_by_angle if float(a) == 0.0), None)
    if ref_key is None:
        raise InputError("biomarker rows must include angle 0 as the reference")
    ref = rows_by_angle[ref_key]
    out: dict[str, float] = {}
    for col, v0 in ref.items():
        if col in _NOT_BIOMARKERS or not _is_number(v0):
            continue
        vals = []
        for angle, row in rows_by_angle.items():
            if col not in row or not _is_number(row[col]):
                raise InputError(f"angle {angle}: biomarker {col!r} missing or not a number")
            vals.append(float(row[col]))
        arr = np.asarray(vals, dtype=np.float64)
        mean = float(arr.mean())
        out[f"{col}_max_abs_delta"] = float(np.max(np.abs(arr - float(v0))))
        out[f"{col}_cv"] = float(arr.std() / abs(mean)) if mean != 0 else 0.0
    return out


# ---------------------------------------------------------------------------------------------- CSV


def format_value(v: Any) -> str:
    """Fixed text for a CSV cell: ints as digits, floats as Python's shortest round-trip ``repr``.

    ``repr`` is exact (reading it back gives the same float) and identical on every run and machine.
    """
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if f == 0.0:
            return "0.0"  # no "-0.0"
        return repr(f)
    return str(v)


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows (dicts with the same keys) as UTF-8 CSV, deterministically and atomically.

    The header follows the first row's key order; cells are :func:`format_value` text.
    """
    if not rows:
        raise InputError("no rows to write")
    cols = list(rows[0].keys())
    for n, r in enumerate(rows):
        if set(r.keys()) != set(cols):
            raise InputError(f"row {n} has columns that differ from the first row's")
    return write_table(path, rows, cols, format_cell=format_value)
