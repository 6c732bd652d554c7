"""Which feature and clustering settings make segments follow the gland/stroma masks? (EBHI-Seg, dev split only.)

Why: `bench_segmentation.py` scores whole `equiseg run` calls, one CLI call per setting; choosing new defaults
needs many settings on the same tiles. Here the CNN features of each tile are computed once per feature setting
(target µm/px, layer, weights, glass mode) through the library (`slide_regions` -> `region_features`, exactly
the pipeline's tiles, halo and tissue cells) and cached under ``--cache`` as ``.npy``; every clustering variant
then runs in memory on those features. Tiles, split and scores are `bench_segmentation`'s and `seg_metrics`'
(imported, not copied): development cases only, tiles taken round-robin over cases.

Cells to pixels: cell (r, c) of a region covers level-0 pixels whose centre lies in
[x0 + c*cell, x0 + (c+1)*cell) x [y0 + r*cell, y0 + (r+1)*cell) (the rasteriser's centre rule, also for a
non-integer cell such as 12.8 px at 1.6 µm/px); pixels of non-tissue cells or outside the grid are unlabelled
and excluded from the scores. Scores are taken after the product's small-segment merge (segments under
2000 µm² join their neighbour, as `equiseg run` exports them); "NMI raw" is before it.

Clustering variants (K-means, seeded, n_init 10, fitted on at most 2000 seeded tissue cells per tile, as
the product does, and predicted on every tissue cell):

* ``l2 (today)``: `equiseg_wsi.cluster.fit_region` itself (L2-normalised features);
* ``l2 -> PCA d`` (optionally whitened): PCA fitted on the tile's tissue cells;
* ``z-score``: every channel standardised over the tile's tissue cells (then optionally PCA);
* ``+ colour w``: the CNN block (L2-normalised, centred, scaled to unit total variance) next to per-cell
  colour (mean R, G, B, H and E optical density of ``rgb2hed``, z-scored, scaled to total variance w²);
  ``colour`` alone on the same cells is the grid-matched colour reference;
* ``smoothed``: the L2-normalised feature map smoothed over tissue cells (Gaussian, sigma in cells) first;
* ``mask majority per cell (ceiling)``: not a method; the best NMI a label map on this grid can reach;
* ``fit w/o edge cells``: cells within one cell (8-neighbourhood) of non-tissue or the grid border are left
  out of the K-means fit but labelled by it (the rim-share definition of `seg_metrics.rim_share`).

Also printed, on the same tiles and K: the colour baselines of `bench_segmentation` (KMeans on per-cell RGB,
H&E OD, mean+std, cells of 4, 8 and 20 µm). Intervals: 95 % case bootstrap (2000 resamples, seeded); the ratio
column is the paired ratio of mean NMI to the best colour baseline of the same K.

Run: ``python benchmarks/explore_features.py [--n-images 40] [--settings all|SLUG,...] [--variants ...]
[--cache /tmp/equiseg-explore-cache] [--out /tmp/equiseg-explore]``; ``--features-only`` fills the cache,
``--check-cli 3`` compares the ``l2 (today)`` labels with ``equiseg run`` on 3 tiles, pixel for pixel;
``--time-cnn 5`` times `region_features` afresh on 5 tiles per setting (the cached timings may include waits for
a shared CPU). Timing on 2 shared CPU cores (load 3-4): filling the cache for the 14 settings and 40 tiles
took about 17 minutes; the default run on a warm cache about 20 minutes (K-means and scoring; the 1-µm/px
layer3+layer4 setting alone 5 minutes), so a cold run is nearer 40 minutes: narrow it with ``--settings``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_segmentation as bs  # noqa: E402
import seg_metrics as sm  # noqa: E402

from equiseg_wsi.cluster import fit_region, l2_normalise  # noqa: E402
from equiseg_wsi.features import build_extractor  # noqa: E402
from equiseg_wsi.inputs import collect_inputs  # noqa: E402
from equiseg_wsi.options import ExtractorSpec, RegionOptions, SegmentOptions  # noqa: E402
from equiseg_wsi.polygons import remove_small_segments  # noqa: E402
from equiseg_wsi.regions import slide_regions  # noqa: E402
from equiseg_wsi.sampling import sample_positions, source_rng  # noqa: E402
from equiseg_wsi.segment import region_features  # noqa: E402
from equiseg_wsi.slide import open_slide  # noqa: E402

MPP = 1.0  # EBHI-Seg µm/px (an estimate, as in bench_segmentation)
N_SAMPLES = 2000
N_INIT = 10
MIN_SEGMENT_UM2 = SegmentOptions().min_segment_um2


# --- feature settings and the cache ---------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureSetting:
    target_mpp: float
    layer: str
    weights: str = "default"  # "default" (packaged model) or "random"
    glass: str = "keep"

    @property
    def slug(self) -> str:
        return f"t{self.target_mpp:g}-{self.layer}-{self.weights}-{self.glass}"

    def spec(self) -> ExtractorSpec:
        return ExtractorSpec(weights=None if self.weights == "default" else "random", layer=self.layer,
                             device="cpu", target_mpp=self.target_mpp)

    def stride(self) -> int:
        return self.spec().stride()


def _s(target: float, layer: str, weights: str = "default", glass: str = "keep") -> FeatureSetting:
    return FeatureSetting(target, layer, weights, glass)


# In order of interest; the CNN cost of each setting is paid once per tile.
SETTINGS = [
    _s(2.5, "layer4"), _s(2.5, "layer4", glass="fill"),
    _s(1.0, "layer4"), _s(1.0, "layer4", glass="fill"),
    _s(1.0, "layer3"), _s(2.5, "layer3"), _s(1.0, "layer3+layer4"), _s(2.5, "layer3+layer4"),
    _s(2.5, "layer4", "random"), _s(1.0, "layer4", "random"),
    _s(1.25, "layer4"), _s(1.6, "layer4"), _s(1.0, "layer2"), _s(2.5, "layer2"),
]


@dataclass
class CellMap:
    """One tile's features on its feature-cell grid, as `region_features` yields them."""

    features: np.ndarray  # (h, w, C) float32
    tissue: np.ndarray  # (h, w) bool
    rgb: np.ndarray  # (h, w, 3) uint8 mean colour of each cell at the target µm/px
    x0: float
    y0: float
    cell: float  # level-0 px per cell
    area: str  # the region's name (the product's sampling seed depends on it)
    seconds: float  # wall time of `region_features` (reading, glass fill, CNN)


def compute_features(tile: bs.Tile, setting: FeatureSetting) -> CellMap:
    """The tile's features exactly as `equiseg run --mpp 1.0` computes them for this setting."""
    extractor = build_extractor(setting.spec())
    options = SegmentOptions(target_mpp=setting.target_mpp, glass=setting.glass)
    source = collect_inputs([tile.image], mpp=MPP)[0]
    with open_slide(tile.image, mpp=MPP) as slide:
        found = slide_regions(slide, source, RegionOptions(mpp=MPP))
        if len(found.areas) != 1:
            raise SystemExit(f"{tile.name}: expected one region, found {len(found.areas)}")
        area = found.areas[0]
        start = time.perf_counter()
        with region_features(slide, area, extractor, options) as rf:
            feats = np.array(rf.features, dtype=np.float32)
            seconds = time.perf_counter() - start
            return CellMap(feats, rf.tissue.copy(), rf.rgb.copy(), rf.x0, rf.y0, rf.cell_level0, area.name, seconds)


def cached_features(tile: bs.Tile, setting: FeatureSetting, cache: Path) -> CellMap:
    """Features of one setting from the cache (computed and stored on first use)."""
    folder = cache / setting.slug
    stem = folder / tile.name
    meta_path = stem.with_suffix(".json")
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        cm = CellMap(np.load(f"{stem}.features.npy"), np.load(f"{stem}.tissue.npy"), np.load(f"{stem}.rgb.npy"),
                     **meta)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        cm = compute_features(tile, setting)
        np.save(f"{stem}.features.npy", cm.features)
        np.save(f"{stem}.tissue.npy", cm.tissue)
        np.save(f"{stem}.rgb.npy", cm.rgb)
        meta = {"x0": cm.x0, "y0": cm.y0, "cell": cm.cell, "area": cm.area, "seconds": cm.seconds}
        meta_path.write_text(json.dumps(meta))  # written last: marks the entry complete
    return cm


def fill_cache(tiles: Sequence[bs.Tile], settings: Sequence[FeatureSetting], cache: Path) -> None:
    """Compute every missing (tile, setting) entry, one setting at a time, with a line per setting."""
    for setting in settings:
        start = time.perf_counter()
        for t in tiles:
            cached_features(t, setting, cache)
        print(f"  features {setting.slug}: {time.perf_counter() - start:.1f} s for {len(tiles)} tiles",
              file=sys.stderr, flush=True)


# --- per-cell colour and the cell -> pixel map ----------------------------------------------------------------

@dataclass
class PixelGrid:
    """Which cell holds each pixel of the tile (centre rule) and the per-cell colour measured on those pixels."""

    rows: np.ndarray  # (H, W) int64 cell row of each pixel, -1 outside the grid
    cols: np.ndarray
    colour: np.ndarray  # (h, w, 10): mean R, G, B, H, E then their standard deviations


def _axis_cells(n_px: int, origin: float, cell: float, n_cells: int) -> np.ndarray:
    idx = np.floor((np.arange(n_px) + 0.5 - origin) / cell).astype(np.int64)
    return np.where((idx >= 0) & (idx < n_cells), idx, -1)


def pixel_grid(rgb: np.ndarray, cm: CellMap, rgb2hed: Callable[[np.ndarray], np.ndarray]) -> PixelGrid:
    """The tile's pixel -> cell map and per-cell colour statistics (mean and std of RGB and H, E density)."""
    h, w = cm.tissue.shape
    rr = _axis_cells(rgb.shape[0], cm.y0, cm.cell, h)
    cc = _axis_cells(rgb.shape[1], cm.x0, cm.cell, w)
    rows, cols = np.broadcast_to(rr[:, None], rgb.shape[:2]), np.broadcast_to(cc[None, :], rgb.shape[:2])
    inside = (rows >= 0) & (cols >= 0)
    ids = (rows * w + cols)[inside]
    values = np.concatenate([rgb.astype(np.float64), rgb2hed(rgb)[..., :2]], axis=-1)[inside]
    count = np.maximum(np.bincount(ids, minlength=h * w), 1)[:, None]
    total = np.stack([np.bincount(ids, weights=values[:, j], minlength=h * w) for j in range(5)], axis=1)
    squares = np.stack([np.bincount(ids, weights=values[:, j] ** 2, minlength=h * w) for j in range(5)], axis=1)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return PixelGrid(np.asarray(rows), np.asarray(cols), np.concatenate([mean, std], axis=1).reshape(h, w, 10))


def to_pixels(labels: np.ndarray, grid: PixelGrid) -> np.ndarray:
    """Label of each pixel (0 where the pixel's cell is not tissue or the pixel lies outside the grid)."""
    out = np.zeros(grid.rows.shape, dtype=np.int32)
    inside = (grid.rows >= 0) & (grid.cols >= 0)
    out[inside] = labels[grid.rows[inside], grid.cols[inside]]
    return out


# --- clustering variants --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    cnn: str = "l2"  # "today" (fit_region itself), "l2", "z" (per-tile z-score), "none" (colour only) or
    # "oracle" (each cell takes the mask class of most of its pixels: what the grid can express at best)
    pca: int = 0  # PCA dimensions (0: none)
    whiten: bool = False
    colour_w: float = 0.0  # weight of the colour block (0: none)
    colour_std: bool = False  # colour block: mean and std (10 values) instead of the 5 means
    edge_free_fit: bool = False  # fit without the cells next to non-tissue or the grid border
    smooth: float = 0.0  # Gaussian sigma, in cells, of a tissue-masked smoothing of the CNN features (0: none)


VARIANTS = [
    Variant("l2 (today)", cnn="today"),
    Variant("l2, fit w/o edge cells", edge_free_fit=True),
    Variant("l2 -> PCA16", pca=16), Variant("l2 -> PCA32", pca=32),
    Variant("l2 -> PCA16 whitened", pca=16, whiten=True), Variant("l2 -> PCA32 whitened", pca=32, whiten=True),
    Variant("z-score", cnn="z"), Variant("z-score -> PCA32 whitened", cnn="z", pca=32, whiten=True),
    Variant("l2 + colour w0.5", colour_w=0.5), Variant("l2 + colour w1", colour_w=1.0),
    Variant("l2 + colour w2", colour_w=2.0),
    Variant("l2 + colour mean+std w0.5", colour_w=0.5, colour_std=True),
    Variant("l2 + colour mean+std w1", colour_w=1.0, colour_std=True),
    Variant("l2 + colour mean+std w2", colour_w=2.0, colour_std=True),
    Variant("l2 + colour mean+std w3", colour_w=3.0, colour_std=True),
    Variant("l2 + colour mean+std w4", colour_w=4.0, colour_std=True),
    Variant("l2 -> PCA8 + colour mean+std w1", pca=8, colour_w=1.0, colour_std=True),
    Variant("l2, smoothed 1 cell", smooth=1.0), Variant("l2, smoothed 1 cell + colour w1", smooth=1.0, colour_w=1.0),
    Variant("colour on this grid", cnn="none", colour_w=1.0),
    Variant("colour mean+std on this grid", cnn="none", colour_w=1.0, colour_std=True),
    Variant("mask majority per cell (ceiling)", cnn="oracle"),
]

# The variants every setting gets by default (`--variants auto`); the full list runs on FULL_GRID_SETTINGS.
CORE_VARIANTS = ("l2 (today)", "l2, fit w/o edge cells", "z-score", "l2 + colour mean+std w1",
                 "l2 + colour mean+std w2", "l2 + colour mean+std w3", "colour mean+std on this grid",
                 "mask majority per cell (ceiling)")
FULL_GRID_SETTINGS = ("t2.5-layer4-default-keep", "t2.5-layer4-default-fill", "t1-layer4-default-keep",
                      "t1-layer4-default-fill")


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    out: np.ndarray = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return out


def _unit_block(x: np.ndarray) -> np.ndarray:
    """Centred, scaled to unit total variance (so blocks of different widths weigh what they are told)."""
    c = x - x.mean(axis=0)
    total = float((c**2).sum(axis=1).mean())
    out: np.ndarray = c / math.sqrt(total) if total > 0 else c
    return out


def smooth_features(features: np.ndarray, tissue: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised convolution of the feature map over tissue cells only (non-tissue cells neither give nor take)."""
    from scipy import ndimage

    w = tissue.astype(np.float64)
    den = ndimage.gaussian_filter(w, sigma, mode="constant")
    num = ndimage.gaussian_filter(features * w[..., None], (sigma, sigma, 0), mode="constant")
    out: np.ndarray = (num / np.maximum(den, 1e-12)[..., None]).astype(np.float32)
    return out


def design_matrix(v: Variant, cnn: np.ndarray, colour: np.ndarray, seed: int) -> np.ndarray:
    """The rows K-means sees for variant `v`, from the tissue cells' CNN features and colour."""
    from sklearn.decomposition import PCA

    blocks = []
    if v.cnn != "none":
        x = l2_normalise(cnn).astype(np.float64) if v.cnn == "l2" else _zscore(cnn.astype(np.float64))
        if v.pca:
            x = PCA(min(v.pca, *x.shape), whiten=v.whiten, random_state=seed).fit_transform(x)
        blocks.append(_unit_block(x) if v.colour_w else x)
    if v.colour_w:
        col = _zscore(colour if v.colour_std else colour[:, :5])
        blocks.append(col / math.sqrt(col.shape[1]) * (1.0 if v.cnn == "none" else v.colour_w))
    return np.concatenate(blocks, axis=1)


def edge_free(tissue: np.ndarray) -> np.ndarray:
    """Tissue cells none of whose 8 neighbours is non-tissue or off the grid."""
    from scipy import ndimage

    padded = np.pad(tissue, 1, constant_values=False)
    near = ndimage.binary_dilation(~padded, structure=np.ones((3, 3), dtype=bool))[1:-1, 1:-1]
    out: np.ndarray = tissue & ~near
    return out


def cluster(v: Variant, cm: CellMap, colour: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Label grid (0 = not tissue, 1..K) of one tile for one variant, before the small-segment merge."""
    from sklearn.cluster import KMeans

    if v.cnn == "today":
        model = fit_region(cm.features, cm.tissue, cm.rgb, k, N_SAMPLES, seed, source=cm.area, n_init=N_INIT)
        return model.predict(cm.features, mask=cm.tissue).astype(np.int32)
    feats = smooth_features(l2_normalise(cm.features), cm.tissue, v.smooth) if v.smooth else cm.features
    x = design_matrix(v, feats[cm.tissue], colour[cm.tissue], seed)
    fit_cells = edge_free(cm.tissue) if v.edge_free_fit else cm.tissue
    if np.count_nonzero(fit_cells) < 10 * k:  # too few interior cells: fit on all of them
        fit_cells = cm.tissue
    idx = sample_positions(fit_cells[cm.tissue], N_SAMPLES, source_rng(seed, cm.area))
    km = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(x[idx])
    labels = np.zeros(cm.tissue.shape, dtype=np.int32)
    labels[cm.tissue] = km.predict(x) + 1
    return labels


def ceiling(grid: PixelGrid, mask: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Each tissue cell labelled with the mask class (1 stroma, 2 gland) holding most of its pixels."""
    h, w = tissue.shape
    inside = (grid.rows >= 0) & (grid.cols >= 0)
    ids = (grid.rows * w + grid.cols)[inside]
    gland = np.bincount(ids, weights=mask[inside].astype(np.float64), minlength=h * w)
    total = np.bincount(ids, minlength=h * w)
    labels = np.where(gland > total / 2, 2, 1).reshape(h, w).astype(np.int32)
    labels[~tissue] = 0
    return labels


def merged(labels: np.ndarray, setting: FeatureSetting) -> np.ndarray:
    """The product's clean-up: segments under MIN_SEGMENT_UM2 join their longest-border neighbour."""
    cell_um = setting.target_mpp * setting.stride()
    return remove_small_segments(labels, int(math.ceil(MIN_SEGMENT_UM2 / (cell_um * cell_um))))


# --- scoring --------------------------------------------------------------------------------------------------

SCORES = ("nmi", "nmi_raw", "ari", "acc", "dice", "bf", "rim")


def _nmi(labels: np.ndarray, mask: np.ndarray) -> float:
    """NMI on the labelled pixels, as `seg_metrics.score_image` computes it (without its boundary scores)."""
    from sklearn.metrics import normalized_mutual_info_score

    valid = labels > 0
    return float(normalized_mutual_info_score(mask[valid].astype(np.int64), labels[valid])) if valid.any() else math.nan


def score_tile(tile: bs.Tile, setting: FeatureSetting, jobs: Sequence[tuple[Variant, int]],
               args: argparse.Namespace, rgb2hed: Callable[[np.ndarray], np.ndarray]) -> list[dict[str, Any]]:
    """Rows (one per (variant, K) job) of one tile and feature setting."""
    cm = cached_features(tile, setting, args.cache)
    rgb = np.asarray(Image.open(tile.image).convert("RGB"))
    mask = np.asarray(Image.open(tile.mask)).astype(bool)
    grid = pixel_grid(rgb, cm, rgb2hed)
    tol_px = bs.BOUNDARY_TOL_UM / MPP
    rows = []
    for v, k in jobs:
        start = time.perf_counter()
        raw = ceiling(grid, mask, cm.tissue) if v.cnn == "oracle" else cluster(v, cm, grid.colour, k, args.seed)
        fit_s = time.perf_counter() - start
        final = merged(raw, setting)
        scores = sm.score_image(to_pixels(final, grid), mask, tol_px)
        nmi_raw = _nmi(to_pixels(raw, grid), mask)
        rows.append({"setting": setting.slug, "variant": v.name, "k": k, "image": tile.name, "case": tile.case,
                     "nmi": scores["nmi"], "nmi_raw": nmi_raw, "ari": scores["ari"], "acc": scores["acc"],
                     "dice": scores["dice"], "bf": scores["bf"], "rim": sm.rim_share(final)[0],
                     "coverage": scores["coverage"], "cnn_s": cm.seconds, "cluster_s": fit_s,
                     "cell_um": setting.target_mpp * setting.stride()})
    return rows


def baseline_rows(tiles: Sequence[bs.Tile], ks: Sequence[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The colour baselines of bench_segmentation on the same tiles, as rows of this script's table."""
    rows = []
    for k in ks:
        key = hashlib.sha256(json.dumps([[t.name for t in tiles], k, args.seed]).encode()).hexdigest()[:16]
        path = args.cache / f"baselines-{key}.json"  # the same tiles, K and seed give the same rows
        if not path.exists():
            scored, _ = bs.score_baselines(tiles, (4.0, 8.0, 20.0), k, args.seed, MPP, bs.BOUNDARY_TOL_UM / MPP)
            path.write_text(json.dumps(scored))
        for r in json.loads(path.read_text()):
            rows.append({"setting": "colour baseline", "variant": f"{r['method']}, {r['cell_um']:g} µm", "k": k,
                         "image": r["image"], "case": r["case"], "nmi": r["nmi"], "nmi_raw": r["nmi"],
                         "ari": r["ari"], "acc": r["acc"], "dice": r["dice"], "bf": r["bf"], "rim": float("nan"),
                         "coverage": r["coverage"], "cnn_s": 0.0, "cluster_s": float("nan"),
                         "cell_um": r["cell_um"]})
    return rows


# --- summary --------------------------------------------------------------------------------------------------

def resample_weights(tiles: Sequence[bs.Tile], seed: int) -> np.ndarray:
    """(resamples, tiles) counts of `seg_metrics.case_resamples`, so every row's bootstrap is one product."""
    resamples = sm.case_resamples([t.case for t in tiles], bs.N_RESAMPLES, seed)
    weights = np.zeros((len(resamples), len(tiles)))
    for i, idx in enumerate(resamples):
        np.add.at(weights[i], idx, 1.0)
    return weights


def _boot_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    ok = np.isfinite(values)
    w = weights * ok
    means: np.ndarray = (w @ np.where(ok, values, 0.0)) / np.maximum(w.sum(axis=1), 1e-12)
    return means


def summarise(rows: Sequence[dict[str, Any]], tiles: Sequence[bs.Tile], seed: int) -> list[dict[str, Any]]:
    """Mean and case-bootstrap interval of every score per (setting, variant, K); NMI ratio to the best colour
    baseline of the same K (paired)."""
    order = {t.name: i for i, t in enumerate(tiles)}
    weights = resample_weights(tiles, seed)
    groups: dict[tuple[str, str, int], dict[str, np.ndarray]] = {}
    for r in rows:
        key = (r["setting"], r["variant"], r["k"])
        g = groups.setdefault(key, {m: np.full(len(tiles), np.nan) for m in (*SCORES, "cnn_s", "cluster_s")})
        for m in g:
            g[m][order[r["image"]]] = r[m]
    best: dict[int, np.ndarray] = {}
    for (setting, _, k), g in groups.items():
        if setting == "colour baseline" and (k not in best or np.nanmean(g["nmi"]) > np.nanmean(best[k])):
            best[k] = g["nmi"]
    out = []
    for (setting, variant, k), g in groups.items():
        s: dict[str, Any] = {"setting": setting, "variant": variant, "k": k}
        for m in SCORES:
            boot = _boot_means(g[m], weights)
            s[m] = (float(np.nanmean(g[m])), *map(float, np.nanpercentile(boot, [2.5, 97.5])))
        if k in best:
            ratio = _boot_means(g["nmi"], weights) / _boot_means(best[k], weights)
            s["ratio"] = (float(np.nanmean(g["nmi"]) / np.nanmean(best[k])),
                          *map(float, np.nanpercentile(ratio, [2.5, 97.5])))
        s["cnn_s"] = float(np.nanmedian(g["cnn_s"]))
        s["cluster_s"] = float(np.nanmean(g["cluster_s"]))
        out.append(s)
    return out


def _ci(v: tuple[float, float, float], digits: int = 3) -> str:
    return "nan" if not math.isfinite(v[0]) else f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def print_table(summary: Sequence[dict[str, Any]]) -> None:
    print("| features | clustering | K | NMI | NMI raw | ARI | matched acc | gland Dice | boundary F | rim share "
          "| NMI / best colour | CNN s/tile | KMeans s/tile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        cells = [_ci(s["nmi"]), f"{s['nmi_raw'][0]:.3f}", f"{s['ari'][0]:.3f}", _ci(s["acc"]), _ci(s["dice"]),
                 f"{s['bf'][0]:.3f}", f"{s['rim'][0]:.3f}" if math.isfinite(s["rim"][0]) else "-",
                 _ci(s["ratio"], 2) if "ratio" in s else "-", f"{s['cnn_s']:.2f}",
                 f"{s['cluster_s']:.3f}" if math.isfinite(s["cluster_s"]) else "-"]
        print(f"| {s['setting']} | {s['variant']} | {s['k']} | " + " | ".join(cells) + " |")


def write_csv(path: Path, summary: Sequence[dict[str, Any]]) -> None:
    """One line per row of the table, intervals as separate columns."""
    flat = []
    for s in summary:
        row: dict[str, Any] = {"setting": s["setting"], "variant": s["variant"], "k": s["k"]}
        for m in (*SCORES, "ratio"):
            v = s.get(m, (float("nan"),) * 3)
            row.update({m: v[0], f"{m}_lo": v[1], f"{m}_hi": v[2]})
        row.update(cnn_s=s["cnn_s"], cluster_s=s["cluster_s"])
        flat.append(row)
    bs.write_csv(path, flat)


def time_cnn(tiles: Sequence[bs.Tile], settings: Sequence[FeatureSetting]) -> None:
    """Median wall time of `region_features` per tile for each setting, recomputed (not cached), after one
    untimed warm-up tile; the cache's own timings were taken while other jobs shared the CPU."""
    print("\n| features | cell µm | cells per tile | region_features s/tile (median) |\n|---|---|---|---|")
    for s in settings:
        compute_features(tiles[0], s)
        runs = [compute_features(t, s) for t in tiles]
        print(f"| {s.slug} | {s.target_mpp * s.stride():g} | {runs[0].tissue.size} "
              f"| {float(np.median([r.seconds for r in runs])):.2f} |")


# --- the check against `equiseg run` --------------------------------------------------------------------------

def check_cli(tiles: Sequence[bs.Tile], setting: FeatureSetting, args: argparse.Namespace) -> None:
    """`l2 (today)` after the merge must give the same pixels and ids as `equiseg run`'s rasterised GeoJSON."""
    rgb2hed, _ = sm.rgb2hed_function()
    with tempfile.TemporaryDirectory(prefix="equiseg-explore-cli-") as tmp:
        out = Path(tmp)
        cmd = [sys.executable, "-m", "equiseg_cli.main", "run", *(str(t.image) for t in tiles), "-o", str(out),
               "--quiet", "--mpp", str(MPP), "--n-clusters", "3", "--seed", str(args.seed), "--device", "cpu",
               "--target-mpp", str(setting.target_mpp), "--layer", setting.layer, "--glass", setting.glass,
               *(["--weights", "random"] if setting.weights == "random" else [])]
        subprocess.run(cmd, check=True)
        for t in tiles:
            cm = cached_features(t, setting, args.cache)
            rgb = np.asarray(Image.open(t.image).convert("RGB"))
            ours = to_pixels(merged(cluster(VARIANTS[0], cm, np.zeros((*cm.tissue.shape, 10)), 3, args.seed),
                                    setting), pixel_grid(rgb, cm, rgb2hed))
            theirs = sm.rasterise_segments(out / t.image.stem / f"{t.image.stem}.geojson", *rgb.shape[:2])
            print(f"check-cli {setting.slug} {t.name}: {np.count_nonzero(ours != theirs)} of {ours.size} pixels "
                  f"differ from `equiseg run`")


# --- main -----------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=40, help="dev tiles, round-robin over cases (default 40)")
    p.add_argument("--settings", default="all", help="comma-separated feature-setting slugs, or all (default)")
    p.add_argument("--variants", default="auto",
                   help="clustering variant names separated by ';', all, or auto (default: every variant on the "
                        "layer4 default-weight settings, CORE_VARIANTS on the others)")
    p.add_argument("--ks", default="3,2", help="K values (default 3,2)")
    p.add_argument("--k2-variants", default="l2 (today);l2 + colour mean+std w2;colour mean+std on this grid",
                   help="variants also run at the K values after the first (';'-separated; all = every one)")
    p.add_argument("--seed", type=int, default=42, help="KMeans, sampling and bootstrap seed (default 42)")
    p.add_argument("--data", type=Path, default=bs.DEFAULT_DATA, help="shared data folder")
    p.add_argument("--cache", type=Path, default=Path("/tmp/equiseg-explore-cache"), help="feature cache folder")
    p.add_argument("--out", type=Path, default=Path("/tmp/equiseg-explore"), help="folder for the CSVs")
    p.add_argument("--features-only", action="store_true", help="only fill the feature cache")
    p.add_argument("--check-cli", type=int, default=0, help="compare with `equiseg run` on this many tiles")
    p.add_argument("--time-cnn", type=int, default=0, help="time the features afresh on this many tiles per setting")
    return p.parse_args(argv)


def _pick(names: str, items: Sequence[Any], key: Callable[[Any], str], sep: str = ";") -> list[Any]:
    if names == "all":
        return list(items)
    wanted = [n.strip() for n in names.split(sep) if n.strip()]
    known = {key(i): i for i in items}
    missing = [n for n in wanted if n not in known]
    if missing:
        raise SystemExit(f"unknown: {', '.join(missing)}; choose from {', '.join(known)}")
    return [known[n] for n in wanted]


def variants_for(setting: FeatureSetting, names: str) -> list[Variant]:
    """The clustering variants of one feature setting (`--variants`)."""
    if names == "auto":
        return VARIANTS if setting.slug in FULL_GRID_SETTINGS else _pick(";".join(CORE_VARIANTS), VARIANTS,
                                                                          lambda v: v.name)
    return _pick(names, VARIANTS, lambda v: v.name)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ebhi = args.data / "ebhi_seg"
    if not (ebhi / "manifest.csv").exists():
        print(f"explore_features: no EBHI-Seg data at {ebhi}; nothing to do.")
        return
    tiles_all = bs.load_tiles(ebhi)
    tiles = bs.select_tiles(tiles_all, bs.case_split(tiles_all), "dev", args.n_images)  # never validation
    settings = _pick(args.settings, SETTINGS, lambda s: s.slug, sep=",")
    ks = [int(k) for k in args.ks.split(",")]
    k2 = VARIANTS if args.k2_variants == "all" else _pick(args.k2_variants, VARIANTS, lambda v: v.name)
    print(f"# {len(tiles)} dev tiles of {len({t.case for t in tiles})} cases, K {ks}, seed {args.seed}, "
          f"{MPP} µm/px; cache {args.cache}")
    start = time.perf_counter()
    fill_cache(tiles, settings, args.cache)
    if args.check_cli:
        for s in settings:
            check_cli(tiles[: args.check_cli], s, args)
    if args.time_cnn:
        time_cnn(tiles[: args.time_cnn], settings)
    if args.features_only:
        return
    rgb2hed, _ = sm.rgb2hed_function()
    rows: list[dict[str, Any]] = []
    with threadpool_limits(1):  # small K-means: threads only contend on a shared CPU
        for s in settings:
            variants = variants_for(s, args.variants)
            jobs = [(v, ks[0]) for v in variants] + [(v, k) for k in ks[1:] for v in k2 if v in variants]
            t0 = time.perf_counter()
            for t in tiles:
                rows += score_tile(t, s, jobs, args, rgb2hed)
            print(f"  clustering {s.slug}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        rows += baseline_rows(tiles, ks, args)
    summary = summarise(rows, tiles, args.seed)
    summary.sort(key=lambda s: (s["k"] != ks[0], s["setting"] != "colour baseline"))
    print_table(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    bs.write_csv(args.out / "per_tile.csv", rows)
    write_csv(args.out / "summary.csv", summary)
    print(f"\n{time.perf_counter() - start:.0f} s in all; per-tile rows {args.out / 'per_tile.csv'}, "
          f"table {args.out / 'summary.csv'}")


if __name__ == "__main__":
    main()
