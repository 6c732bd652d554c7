"""One region of one slide, streamed: tiles -> features -> KMeans -> label map at feature-cell resolution.

Features go to a memory-mapped scratch file, so a whole-slide region never has to fit in RAM; what stays in
memory is per feature cell (tissue flag, mean colour, label), 8 x 8 target pixels each.
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from equiseg_wsi.cluster import ClusterModel, fit_region
from equiseg_wsi.errors import InputError, one_line
from equiseg_wsi.export.cluster_key import exemplar_cells, exemplar_gap
from equiseg_wsi.options import SegmentOptions
from equiseg_wsi.polygons import Box, GridPlacement, cell_coverage, remove_small_segments
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.refine import fine_factor, refine_region
from equiseg_wsi.regions import RegionArea
from equiseg_wsi.scratch import scratch_area, temporary_scratch
from equiseg_wsi.slide import Slide
from equiseg_wsi.tile_features import (
    Extractor,
    RemoteTiles,
    plan_tiles,
    region_clip,
    tile_batches,
)

# Features of regions smaller than this stay in RAM; larger ones go to a scratch file.
IN_MEMORY_FEATURE_BYTES = 256 * 1024 * 1024


@dataclass
class RegionSegmentation:
    """Label map (0 = background, 1..K) at feature-cell resolution and what is needed to export it."""

    name: str
    labels: np.ndarray
    rgb: np.ndarray  # mean colour of each feature cell, uint8 (h, w, 3)
    x0: float  # level-0 top-left of the label map
    y0: float
    cell_level0: float  # level-0 px per feature cell
    cell_um: float
    model: ClusterModel
    n_tiles: int
    clip: Box | None = None  # level-0 box the segments are cut to (the region inside the image); None: whole grid
    warnings: list[str] = field(default_factory=list)  # one line each: no structure, few cells, vanished clusters
    seconds: dict[str, float] = field(default_factory=dict)  # per stage (STAGES), for the manifest and benchmarks
    # per cluster, the few tissue cells nearest its centroid: (cluster id, squared distance, level-0 x, y of the
    # cell centre); the run's cluster key shows the tissue around them (equiseg_wsi.export.cluster_key)
    exemplars: list[tuple[int, float, float, float]] = field(default_factory=list)


    def coverage(self) -> np.ndarray:
        """Share of each label cell inside `clip`: the weights of the areas in the tables."""
        return cell_coverage(self.labels.shape, GridPlacement(self.x0, self.y0, self.cell_level0), self.clip)


# Stages of one region, timed in `segment_region`: reading tiles (and the glass fill), the network, KMeans fit and
# assignment, the border refinement with the small-segment merges.
STAGES = ("read", "cnn", "kmeans", "refine")


@dataclass
class RegionFeatures:
    """A region's features before clustering, on its feature-cell grid (what fitting and predicting read).

    `features` (h, w, C) float32 may be a memory-mapped scratch array: valid only inside `region_features`.
    """

    name: str
    features: np.ndarray
    tissue: np.ndarray  # (h, w) bool: cells counted as tissue
    rgb: np.ndarray  # (h, w, 3) uint8 mean colour of each cell
    x0: float  # level-0 top-left of the cell grid
    y0: float
    cell_level0: float  # level-0 px per feature cell
    n_tiles: int
    seconds: dict[str, float] = field(default_factory=dict)  # "read" and "cnn"


@contextmanager
def region_features(
    slide: Slide,
    area: RegionArea,
    extractor: Extractor,
    options: SegmentOptions,
    *,
    progress: ProgressCallback = no_progress,
    scratch_dir: str | Path | None = None,
    cache: FeatureCache | None = None,
    remote: RemoteTiles | None = None,
) -> Iterator[RegionFeatures]:
    """Stream a region's tiles through the extractor; yields its feature map, tissue cells and cell colours.

    A context manager because a large region's features live in a scratch file that is removed on exit. With a
    `cache`, features computed once (e.g. while a run-wide KMeans is fitted) are read back instead of recomputed.
    With `remote` (a distributed run), a region of several tiles has them computed by the workers.
    """
    if cache is not None:
        cached = cache.load(slide, area, extractor, options)
        if cached is not None:
            yield cached
            return
    if scratch_dir is None and cache is not None:  # scratch on the cache's disk (a run's: in its output folder)
        scratch_dir = scratch_area(cache.folder.parent)
    with _computed_features(slide, area, extractor, options, progress, scratch_dir, remote) as rf:
        if cache is not None:
            cache.save(slide, area, extractor, options, rf)
        yield rf


@contextmanager
def _computed_features(slide: Slide, area: RegionArea, extractor: Extractor, options: SegmentOptions,
                       progress: ProgressCallback, scratch_dir: str | Path | None,
                       remote: RemoteTiles | None = None) -> Iterator[RegionFeatures]:
    plan = plan_tiles(slide, area, extractor, options)
    gh, gw = plan.shape
    per = plan.tile_size // extractor.stride
    rgb = np.full((gh, gw, 3), 255, dtype=np.uint8)
    if remote is not None:  # a distributed run: every region's tiles on the workers (a one-tile core's too)
        batches = remote(slide, area, plan)
    else:
        batches = tile_batches(slide, area, plan.tiles, extractor, options, plan.tile_size, plan.halo)
    with temporary_scratch(scratch_dir) as tmp:  # removed on exit; made only when the features need a file
        features = _feature_store(tmp, (gh, gw, extractor.channels))
        done = 0
        seconds = {"read": 0.0, "cnn": 0.0}
        for batch in batches:
            for stage in seconds:
                seconds[stage] += batch.seconds.get(stage, 0.0)
            for tile, fmap, means in zip(batch.tiles, batch.maps, batch.rgb, strict=True):
                r0, c0 = tile.row * per, tile.col * per
                r1, c1 = min(r0 + per, gh), min(c0 + per, gw)
                features[r0:r1, c0:c1] = fmap[: r1 - r0, : c1 - c0]
                rgb[r0:r1, c0:c1] = means[: r1 - r0, : c1 - c0]
            done += len(batch.tiles)
            progress(done, len(plan.tiles), "tiles")
        try:
            yield RegionFeatures(area.name, features, plan.tissue, rgb, plan.x0, plan.y0, plan.cell_level0,
                                 len(plan.tiles), seconds)
        finally:
            del features


class FeatureCache:
    """A run's region features on disk (`folder/<key>.npz`), so a run-wide KMeans fit and the segmentation that
    follows compute each region's features once. The key covers the slide file (path, size, modification time),
    the region's box and tissue, the options that shape features and the model's identity; an entry is removed
    once its region is segmented (`discard`). About C x 4 bytes per feature cell (14 MB for a 1.3-mm core)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def key(self, slide: Slide, area: RegionArea, extractor: Extractor, options: SegmentOptions) -> str:
        import hashlib
        import json

        path = Path(str(slide.path))
        try:
            st = path.stat()
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = []
        text = json.dumps({
            "slide": str(path.resolve()) if stamp else str(path), "stamp": stamp, "region": area.name,
            "rect": [round(v, 6) for v in area.rect_level0], "tissue": hashlib.sha256(
                np.packbits(np.asarray(area.tissue.mask, dtype=bool)).tobytes()).hexdigest(),
            "features": extractor.feature_identity.as_dict(), "halo": options.halo, "tile": options.tile_size,
            "glass": options.glass, "min_cell_tissue": options.min_cell_tissue,
        }, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _file(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def load(self, slide: Slide, area: RegionArea, extractor: Extractor, options: SegmentOptions
             ) -> RegionFeatures | None:
        f = self._file(self.key(slide, area, extractor, options))
        try:
            with np.load(f, allow_pickle=False) as z:
                meta = z["meta"]
                return RegionFeatures(area.name, z["features"], z["tissue"], z["rgb"], float(meta[0]), float(meta[1]),
                                      float(meta[2]), int(meta[3]), {"read": 0.0, "cnn": 0.0})
        except (OSError, KeyError, ValueError):
            return None

    def save(self, slide: Slide, area: RegionArea, extractor: Extractor, options: SegmentOptions,
             rf: RegionFeatures) -> None:
        from equiseg_wsi.export.atomic import atomic_path

        self.folder.mkdir(parents=True, exist_ok=True)
        meta = np.array([rf.x0, rf.y0, rf.cell_level0, rf.n_tiles], dtype=np.float64)
        with atomic_path(self._file(self.key(slide, area, extractor, options)), fsync=False) as tmp, \
                open(tmp, "wb") as fh:
            np.savez(fh, features=np.asarray(rf.features), tissue=rf.tissue, rgb=rf.rgb, meta=meta)

    def discard(self, slide: Slide, area: RegionArea, extractor: Extractor, options: SegmentOptions) -> None:
        self._file(self.key(slide, area, extractor, options)).unlink(missing_ok=True)


def segment_region(
    slide: Slide,
    area: RegionArea,
    extractor: Extractor,
    options: SegmentOptions,
    *,
    model: ClusterModel | None = None,
    progress: ProgressCallback = no_progress,
    scratch_dir: str | Path | None = None,
    cache: FeatureCache | None = None,
) -> RegionSegmentation:
    """Segment one region: fit KMeans on it (intra mode) or apply `model` (a run, slide or cohort model).

    With a `cache` the region's features are taken from it when there, and its entry is removed afterwards."""
    with region_features(slide, area, extractor, options, progress=progress, scratch_dir=scratch_dir,
                         cache=cache) as rf:
        start = time.perf_counter()
        flat = _no_structure(area.name, rf.rgb[rf.tissue])
        if model is None:
            try:
                model = fit_region(
                    rf.features, fit_cells(rf.tissue, options.n_clusters), rf.rgb, options.n_clusters,
                    options.n_samples, options.seed,
                    source=area.name, feature_identity=extractor.feature_identity.as_dict(),
                )
            except InputError as exc:  # e.g. an all-black image: every cell's features are the same
                if flat is None:
                    raise
                raise InputError(f"{flat}: is this image blank or black? ({one_line(exc)})") from exc
        labels = edge_corrected_labels(rf.features, rf.tissue, model.predict(rf.features, mask=rf.tissue), model)
        exemplars = exemplar_cells(rf.features, labels, model, rf.x0, rf.y0, rf.cell_level0,
                                   min_gap=exemplar_gap(options.target_mpp * extractor.stride))
    if cache is not None:
        cache.discard(slide, area, extractor, options)
    seconds = {**rf.seconds, "kmeans": time.perf_counter() - start}
    start = time.perf_counter()
    cell_um = options.target_mpp * extractor.stride
    warnings = _flat_warning(flat) + _few_cells(area.name, int(rf.tissue.sum()), cell_um)
    labels = _merge_small(labels, options.min_segment_um2, cell_um)
    seg = RegionSegmentation(area.name, labels, rf.rgb, rf.x0, rf.y0, rf.cell_level0, cell_um, model, rf.n_tiles,
                             clip=region_clip(slide, area), exemplars=exemplars)
    if options.refine == "colour":
        factor = fine_factor(extractor.stride, options.target_mpp, labels.size)
        fine, rgb = refine_region(slide, labels, area.tissue, rf.x0, rf.y0, rf.cell_level0, factor, model.k)
        seg = replace(seg, labels=_merge_small(fine, options.min_segment_um2, cell_um / factor), rgb=rgb,
                      cell_level0=rf.cell_level0 / factor, cell_um=cell_um / factor)
    seg.warnings = warnings + _vanished(area.name, seg.labels, model.k)
    seconds["refine"] = time.perf_counter() - start
    seg.seconds = {k: round(seconds[k], 3) for k in STAGES}
    return seg


# Share of a region's tissue cells that must be interior (no background or map edge among their 8 neighbours) for
# KMeans to be fitted on interior cells only; below it (thin or fragmented tissue) every tissue cell is used.
MIN_INTERIOR_SHARE = 0.25


def fit_cells(tissue: np.ndarray, k: int) -> np.ndarray:
    """The cells KMeans is fitted on: the tissue cells with no background within one cell, when there are enough.

    Why: an edge cell's receptive field still reaches past the tissue, so edge cells are a population of their own
    and, fitted on, can take a cluster of their own (a "rim" that follows the glass). Fitted on interior cells only,
    the centres are tissue classes, and edge cells are then assigned to the nearest of them. Measured (osteosarcoma,
    20 tiles): largest rim share 0.257 -> 0.234; EBHI-Seg development NMI 0.469 -> 0.464 (within its interval).
    The erosion uses the full 3 x 3 square, so the choice commutes with quarter turns and flips."""
    inner = ndimage.binary_erosion(tissue, structure=np.ones((3, 3), dtype=bool), border_value=0)
    enough = inner.sum() >= max(50 * k, MIN_INTERIOR_SHARE * tissue.sum())
    return inner if enough else tissue


_ROWS_PER_BAND = 64  # feature-map rows read at a time (bounded memory for memory-mapped maps)


def edge_corrected_labels(features: np.ndarray, tissue: np.ndarray, labels: np.ndarray,
                          model: ClusterModel) -> np.ndarray:
    """`labels` with each edge cell (tissue, not among `fit_cells`) predicted again after the region's mean
    edge-minus-interior feature difference is taken off its features.

    Why: glass in an edge cell's receptive field shifts its features much the same way all round the tissue, and
    with one run-wide model the shift can carry a region's edge cells to a cluster that is rare inside it, a rim.
    Measured (osteosarcoma development tiles): rim share 0.278 -> 0.169; EBHI-Seg NMI unchanged. Two rings
    corrected gave 0.131 but cost 0.011 NMI. Thin tissue (`fit_cells` uses every cell): nothing changes. Square
    erosion and region means commute with quarter turns and flips."""
    inner = fit_cells(tissue, model.k)
    edge = tissue & ~inner
    if not edge.any() or not inner.any():
        return labels
    sums = np.zeros((2, model.n_features))
    for r0 in range(0, tissue.shape[0], _ROWS_PER_BAND):
        rows = slice(r0, r0 + _ROWS_PER_BAND)
        band = np.asarray(features[rows], dtype=np.float64)
        sums[0] += band[edge[rows]].sum(axis=0)
        sums[1] += band[inner[rows]].sum(axis=0)
    shift = (sums[0] / edge.sum() - sums[1] / inner.sum()).astype(np.float32)
    out: np.ndarray = labels.copy()
    for r0 in range(0, tissue.shape[0], _ROWS_PER_BAND):
        rows = slice(r0, r0 + _ROWS_PER_BAND)
        if edge[rows].any():
            out[rows][edge[rows]] = model.predict(np.asarray(features[rows])[edge[rows]] - shift)
    return out


MIN_CELLS = 400  # tissue cells (20 x 20) below which a region's segments say little; the user is warned


def _few_cells(name: str, n_cells: int, cell_um: float) -> list[str]:
    if n_cells >= MIN_CELLS:
        return []
    return [f"region {name}: only {n_cells} tissue cells of {cell_um:g} µm (fewer than {MIN_CELLS}); its segments "
            "are coarse, a finer --target-mpp gives more cells"]


# Spread of the tissue cells' mean colours (grey levels, robust standard deviation of the most varied channel)
# below which a region has no structure: a black, blank or flat image. Measured through `equiseg run` at 4 and
# 2.5 µm/px: the sample slide and the four sample cores 13-46, black / flat grey / flat pink images 0.
MIN_COLOUR_SPREAD = 2.0


def colour_spread(cell_rgb: np.ndarray) -> float:
    """Robust standard deviation (1.4826 x median absolute deviation) of `cell_rgb` (n, 3), per channel; the
    largest. Robust because cells at the image edge average in the padding beyond it (white): on a black image
    they alone would give a plain standard deviation of about 18."""
    c = np.asarray(cell_rgb, dtype=np.float64).reshape(-1, 3)
    if not c.size:
        return 0.0
    mad = np.median(np.abs(c - np.median(c, axis=0)), axis=0)
    return float(1.4826 * mad.max())


def _no_structure(name: str, cell_rgb: np.ndarray) -> str | None:
    """'region NAME: no structure (...)' when the region's tissue cells are all one colour, else None."""
    spread = colour_spread(cell_rgb)
    if spread >= MIN_COLOUR_SPREAD:
        return None
    return f"region {name}: no structure (cell colours vary by only {spread:.1f} grey levels)"


def _flat_warning(flat: str | None) -> list[str]:
    return [] if flat is None else [f"{flat}; its clusters are not tissue classes — is this image blank or black?"]


def _vanished(name: str, labels: np.ndarray, k: int) -> list[str]:
    counts = np.bincount(np.asarray(labels).ravel(), minlength=k + 1)  # not np.unique: no sort of a fine map
    missing = [i for i in range(1, k + 1) if counts[i] == 0]
    if not missing:
        return []
    names = ", ".join(f"Cluster {i}" for i in missing)
    return [f"region {name}: {names} of {k} cover(s) no tissue here (none assigned, or merged away as smaller "
            "than --min-area)"]


def _merge_small(labels: np.ndarray, min_segment_um2: float, cell_um: float) -> np.ndarray:
    """Segments smaller than `min_segment_um2` join the neighbour they share the longest border with."""
    min_cells = int(math.ceil(min_segment_um2 / (cell_um * cell_um)))
    return remove_small_segments(labels, min_cells) if min_cells > 1 else labels


def _feature_store(folder: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Zeroed (h, w, C) float32 features: in RAM when small, else a file in `folder` (created here).

    The file's blocks are reserved up front, so a full disk fails here with ENOSPC rather than with SIGBUS
    when a page of the memory map is first written."""
    nbytes = shape[0] * shape[1] * shape[2] * 4
    if nbytes <= IN_MEMORY_FEATURE_BYTES:
        return np.zeros(shape, dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    store = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float32, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(folder / "features.npy", "rb+") as fh:
            try:
                os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # file systems without it
                    raise
    return store
