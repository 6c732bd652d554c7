"""Scoring helpers of ``bench_segmentation.py``: segments against a binary mask, colour baselines, rim share.

Everything here works at the mask's own pixel grid. A label map holds cluster ids 1..K and 0 for pixels a method
left unlabelled; those pixels are excluded from every score (the same rule for every method).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import rasterio.features
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from shapely.geometry import shape
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

# scikit-image's Ruifrok-Johnston stain matrix (rows: haematoxylin, eosin, DAB), not row-normalised.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
FEATURE_SETS = ("rgb", "hed", "rgb+hed+std")
FEATURE_LABELS = {
    "rgb": "KMeans mean RGB",
    "hed": "KMeans mean H&E OD",
    "rgb+hed+std": "KMeans mean+std RGB & H&E OD",
}


def _rgb2hed_exact(rgb: np.ndarray) -> np.ndarray:
    """What ``skimage.color.rgb2hed`` computes for uint8 RGB (used when scikit-image is not installed)."""
    x = np.maximum(np.asarray(rgb, dtype=np.float64) / 255.0, 1e-6)
    stains = (np.log(x) / np.log(1e-6)) @ np.linalg.inv(RGB_FROM_HED)
    out: np.ndarray = np.maximum(stains, 0.0)
    return out


def rgb2hed_function() -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """``skimage.color.rgb2hed`` when installed, otherwise the identical formula above; with its name."""
    try:
        return importlib.import_module("skimage.color").rgb2hed, "skimage.color.rgb2hed"
    except ImportError:
        return _rgb2hed_exact, "rgb2hed (scikit-image's formula; scikit-image not installed)"


# --- exported segments -> label map ---------------------------------------------------------------------------

def rasterise_segments(geojson: Path, height: int, width: int) -> np.ndarray:
    """Label map (cluster id per pixel, 0 = no segment) of the ``Cluster i`` annotations of an exported GeoJSON.

    Coordinates are QuPath level-0 px (pixel (r, c) spans x in [c, c+1), y in [r, r+1)); a pixel belongs to the
    polygon that holds its centre (rasterio's default rule), so cell-aligned polygons map to pixels exactly.
    """
    features = json.loads(geojson.read_text())["features"]
    shapes = []
    for feature in features:
        name = ((feature.get("properties") or {}).get("classification") or {}).get("name", "")
        if name.startswith("Cluster "):
            shapes.append((shape(feature["geometry"]), int(name.split()[1])))
    if not shapes:
        return np.zeros((height, width), dtype=np.int32)
    out = rasterio.features.rasterize(shapes, out_shape=(height, width), fill=0, dtype="int32")
    return np.asarray(out, dtype=np.int32)


# --- scores ---------------------------------------------------------------------------------------------------

def boundary_pixels(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Valid pixels with a valid 4-neighbour of another label (both sides of an edge are marked)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        diff = (labels[tuple(a)] != labels[tuple(b)]) & valid[tuple(a)] & valid[tuple(b)]
        edge[tuple(a)] |= diff
        edge[tuple(b)] |= diff
    return edge


def boundary_f(pred: np.ndarray, true: np.ndarray, tol_px: float) -> float:
    """F-measure of two boundary maps: a boundary pixel is matched when the other map has one within tol_px."""
    if not pred.any() and not true.any():
        return 1.0
    if not pred.any() or not true.any():
        return 0.0
    precision = float(np.mean(ndimage.distance_transform_edt(~true)[pred] <= tol_px))
    recall = float(np.mean(ndimage.distance_transform_edt(~pred)[true] <= tol_px))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score_image(labels: np.ndarray, mask: np.ndarray, tol_px: float) -> dict[str, float]:
    """Scores of one label map against a binary mask (True = gland), on the pixels the map labels.

    acc: many-to-one matching (each cluster takes the mask class holding most of its pixels, which maximises
    accuracy); acc_1to1: Hungarian one-to-one matching (clusters left unmatched count as wrong); dice: gland
    Dice of the many-to-one assignment; bf: boundary F of that gland/stroma assignment against the mask edges
    (so an edge between two clusters of the same class is not counted); bf_clusters: of the raw cluster edges.
    """
    valid = labels > 0
    coverage = float(valid.mean())
    if not valid.any():
        return {"coverage": 0.0} | dict.fromkeys(("nmi", "ari", "acc", "acc_1to1", "dice", "bf", "bf_clusters"),
                                                float("nan"))
    lab, truth = labels[valid], mask[valid].astype(np.int64)
    ids, inverse = np.unique(lab, return_inverse=True)
    table = np.zeros((len(ids), 2), dtype=np.int64)
    np.add.at(table, (inverse, truth), 1)
    to_gland = table[:, 1] > table[:, 0]
    rows, cols = linear_sum_assignment(-table)
    pred_gland = np.zeros(labels.shape, dtype=bool)
    pred_gland[valid] = to_gland[inverse]
    gland = mask.astype(bool)
    both = np.count_nonzero(pred_gland & gland & valid)
    denom = np.count_nonzero(pred_gland) + np.count_nonzero(gland & valid)
    true_edges = boundary_pixels(gland, valid)
    return {
        "nmi": float(normalized_mutual_info_score(truth, lab)),
        "ari": float(adjusted_rand_score(truth, lab)),
        "acc": float(table.max(axis=1).sum() / lab.size),
        "acc_1to1": float(table[rows, cols].sum() / lab.size),
        "dice": 1.0 if denom == 0 else float(2.0 * both / denom),
        "bf": boundary_f(boundary_pixels(pred_gland, valid), true_edges, tol_px),
        "bf_clusters": boundary_f(boundary_pixels(labels, valid), true_edges, tol_px),
        "coverage": coverage,
    }


# --- colour baselines -----------------------------------------------------------------------------------------

def _cell_stats(values: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell mean, std and pixel count of (H, W, C) values on square cells from the origin (edge cells partial)."""
    h, w, c = values.shape
    ny, nx = -(-h // cell), -(-w // cell)
    padded = np.zeros((ny * cell, nx * cell, c), dtype=np.float64)
    inside = np.zeros((ny * cell, nx * cell), dtype=np.float64)
    padded[:h, :w], inside[:h, :w] = values, 1.0
    count = inside.reshape(ny, cell, nx, cell).sum(axis=(1, 3))
    total = padded.reshape(ny, cell, nx, cell, c).sum(axis=(1, 3))
    squares = (padded**2).reshape(ny, cell, nx, cell, c).sum(axis=(1, 3))
    mean = total / np.maximum(count, 1.0)[..., None]
    std = np.sqrt(np.maximum(squares / np.maximum(count, 1.0)[..., None] - mean**2, 0.0))
    return mean, std, count


def colour_baseline(rgb: np.ndarray, cell: int, feature_set: str, k: int, seed: int,
                    rgb2hed: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Pixel label map of KMeans (K, seeded, n_init 10) on per-cell colour features of one image.

    Features are z-scored over the image's cells. A cell with less than half its area inside the image is left
    unlabelled, as the pipeline leaves such edge cells out; every other cell's label covers its pixels exactly.
    """
    channels = {"rgb": rgb.astype(np.float64), "hed": rgb2hed(rgb)[..., :2]}
    if feature_set == "rgb+hed+std":
        values = np.concatenate([channels["rgb"], channels["hed"]], axis=-1)
    else:
        values = channels[feature_set]
    mean, std, count = _cell_stats(values, cell)
    feats = np.concatenate([mean, std], axis=-1) if feature_set.endswith("+std") else mean
    keep = count >= 0.5 * cell * cell
    x = feats[keep]
    x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    cells = np.zeros(keep.shape, dtype=np.int32)
    n_clusters = min(k, len(np.unique(x, axis=0)))
    cells[keep] = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x) + 1
    full = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)
    return full[: rgb.shape[0], : rgb.shape[1]]


# --- rim share ------------------------------------------------------------------------------------------------

def rim_share(labels: np.ndarray, width: int = 1) -> tuple[float, float]:
    """(largest share of one cluster's pixels next to glass, share of all labelled pixels next to glass).

    A pixel is next to glass when background (label 0) or the map's edge lies within `width` pixels of it
    (8-neighbourhood steps): one feature cell, so `width` is the number of map pixels per feature cell (1 on the
    cell grid, 8 on a refined map of 1-µm pixels at 1 µm/px). The second figure is what any cluster would score
    if it were spread at random over the tissue.
    """
    padded = np.pad(labels, width, constant_values=0)
    size = 2 * width + 1
    near_glass = ndimage.binary_dilation(padded == 0, structure=np.ones((size, size), dtype=bool))
    near_glass = near_glass[width:-width, width:-width]
    tissue = labels > 0
    if not tissue.any():
        return float("nan"), float("nan")
    shares = [np.count_nonzero(near_glass & (labels == c)) / np.count_nonzero(labels == c)
              for c in np.unique(labels[tissue])]
    return float(max(shares)), float(np.count_nonzero(near_glass & tissue) / np.count_nonzero(tissue))


# --- aggregation ----------------------------------------------------------------------------------------------

def case_resamples(cases: Sequence[str], n_resamples: int, seed: int) -> list[np.ndarray]:
    """Image indices of each bootstrap resample: cases drawn with replacement, each bringing all its images."""
    unique = sorted(set(cases))
    members = {c: np.flatnonzero(np.asarray(cases) == c) for c in unique}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(unique), size=(n_resamples, len(unique)))
    return [np.concatenate([members[unique[i]] for i in row]) for row in draws]


def mean_interval(values: np.ndarray, resamples: Sequence[np.ndarray]) -> tuple[float, float, float]:
    """Mean over images and the 95 % percentile interval of that mean over the case resamples (NaN ignored)."""
    if np.all(np.isnan(values)):
        return float("nan"), float("nan"), float("nan")
    means = np.array([np.nanmean(values[idx]) if np.isfinite(values[idx]).any() else np.nan for idx in resamples])
    lo, hi = np.nanpercentile(means, [2.5, 97.5])
    return float(np.nanmean(values)), float(lo), float(hi)


def ratio_interval(num: np.ndarray, den: np.ndarray, resamples: Sequence[np.ndarray]) -> tuple[float, float, float]:
    """Ratio of two methods' mean scores on the same images, with a paired case-bootstrap 95 % interval."""
    ratios = np.array([np.nanmean(num[idx]) / np.nanmean(den[idx]) for idx in resamples])
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    return float(np.nanmean(num) / np.nanmean(den)), float(lo), float(hi)
