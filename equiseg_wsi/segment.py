"""One region of one slide, streamed: tiles -> features -> KMeans -> label map at feature-cell resolution.

Features go to a memory-mapped scratch file, so a whole-slide region never has to fit in RAM; what stays in
memory is per feature cell (tissue flag, mean colour, label), 8 x 8 target pixels each.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from equiseg_wsi.cluster import ClusterModel, fit_region
from equiseg_wsi.errors import NoTissueError
from equiseg_wsi.polygons import remove_small_segments
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.slide import Slide
from equiseg_wsi.tiling import Tile, TileGrid, read_tile
from equiseg_wsi.tissue import TissueMap, TissueRegion, detect_tissue

# Features of regions smaller than this stay in RAM; larger ones go to a scratch file.
IN_MEMORY_FEATURE_BYTES = 256 * 1024 * 1024


class Extractor(Protocol):
    """What segmentation needs of a feature extractor (see equiseg_wsi.features)."""

    stride: int
    channels: int
    batch_size: int
    recommended_halo: int

    def extract(self, tiles: np.ndarray, halo: int = 0) -> np.ndarray: ...


@dataclass(frozen=True)
class SegmentOptions:
    """How a region is segmented; units in the names."""

    n_clusters: int = 3
    n_samples: int = 2000
    seed: int = 42
    target_mpp: float = 2.5
    tile_size: int = 512
    halo: int | None = None  # px at target_mpp; None: the extractor's recommended halo
    min_segment_um2: float = 2000.0
    min_cell_tissue: float = 0.5


@dataclass
class RegionArea:
    """A region to segment: its name, level-0 rectangle and tissue mask (at the tissue map's resolution)."""

    name: str
    rect_level0: tuple[float, float, float, float]
    tissue: TissueMap  # mask restricted to this region, same geometry as the slide's tissue map


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


def region_areas(tissue: TissueMap, as_one_core: bool, core_name: str, min_region_um2: float = 0.0) -> list[RegionArea]:
    """A core image is one region (all its tissue); a slide without a TMA grid is one region per tissue piece
    of at least `min_region_um2` µm²."""
    if as_one_core:
        rows, cols = np.nonzero(tissue.mask)
        if rows.size == 0:
            return []
        px = tissue.px_level0
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        rect = (c0 * px, r0 * px, (c1 - c0) * px, (r1 - r0) * px)
        return [RegionArea(core_name, rect, tissue)]
    return [RegionArea(r.name, r.bbox_level0, _only(tissue, r)) for r in tissue.regions if r.area_um2 >= min_region_um2]


@dataclass
class SlideRegions:
    """What `slide_regions` found: the slide's tissue map, its TMA grid (None unless dearrayed) and the regions."""

    tissue: TissueMap
    grid: Any  # equiseg_wsi.tma.TmaGrid | None (typed loosely: tma imports this module)
    areas: list[RegionArea]


def slide_regions(
    slide: Slide,
    *,
    is_core: bool,
    core_name: str,
    tissue_mpp: float = 8.0,
    min_tissue_area_um2: float = 20000.0,
    tma: bool | None = None,
    core_diameter_um: float | None = None,
) -> SlideRegions:
    """The regions `equiseg run` segments: a core image is one region; a TMA slide one region per present
    core (dearrayed when `tma` is True, or when None and the slide looks like a TMA); any other slide one
    region per tissue piece. One definition, so fit, run and robustness see the same regions."""
    from equiseg_wsi.tma import core_areas, dearray, is_tma

    tissue = detect_tissue(slide, tissue_mpp)  # debris removed; small pieces of a core image still count
    if not is_core and tma is not False and (tma or is_tma(tissue)):
        grid = dearray(tissue, core_diameter_um=core_diameter_um)
        return SlideRegions(tissue, grid, core_areas(grid, tissue))
    return SlideRegions(tissue, None, region_areas(tissue, is_core, core_name, min_tissue_area_um2))


def _only(tissue: TissueMap, region: TissueRegion) -> TissueMap:
    """The slide's tissue map with every other tissue piece removed (same geometry)."""
    mask = np.zeros_like(tissue.mask)
    c, r, w, h = region.bbox_mask
    mask[r : r + h, c : c + w] = region.mask_crop
    return TissueMap(mask=mask, mpp=tissue.mpp, px_level0=tissue.px_level0, tissue_fraction=float(mask.mean()))


def cell_tissue_fraction(tissue: TissueMap, x0: float, y0: float, cell: float, shape: tuple[int, int]) -> np.ndarray:
    """Share of each feature cell covered by tissue (area-weighted resampling of the coarse mask)."""
    h, w = shape
    px = tissue.px_level0
    box = (x0 / px, y0 / px, (x0 + w * cell) / px, (y0 + h * cell) / px)
    if min(box[:2]) < 0:
        raise ValueError("feature grid starts outside the tissue mask")
    mh, mw = tissue.mask.shape
    padded = np.zeros((max(mh, math.ceil(box[3])), max(mw, math.ceil(box[2]))), dtype=np.float32)
    padded[:mh, :mw] = tissue.mask  # cells beyond the mask's edge are not tissue
    mask = Image.fromarray(padded, mode="F")
    return np.asarray(mask.resize((w, h), Image.Resampling.BOX, box=box), dtype=np.float32)


def _batches(tiles: Iterable[Tile], slide: Slide, mpp: float, size: int) -> Iterator[tuple[list[Tile], np.ndarray]]:
    batch: list[Tile] = []
    pixels: list[np.ndarray] = []
    for tile in tiles:
        batch.append(tile)
        pixels.append(read_tile(slide, tile, mpp))
        if len(batch) == size:
            yield batch, np.stack(pixels)
            batch, pixels = [], []
    if batch:
        yield batch, np.stack(pixels)


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


@contextmanager
def region_features(
    slide: Slide,
    area: RegionArea,
    extractor: Extractor,
    options: SegmentOptions,
    *,
    progress: ProgressCallback = no_progress,
    scratch_dir: str | Path | None = None,
) -> Iterator[RegionFeatures]:
    """Stream a region's tiles through the extractor; yields its feature map, tissue cells and cell colours.

    A context manager because a large region's features live in a scratch file that is removed on exit.
    """
    stride = extractor.stride
    halo = extractor.recommended_halo if options.halo is None else options.halo
    if options.tile_size % stride or halo % stride:
        raise ValueError(f"tile size and halo must be multiples of the feature stride {stride}")
    s = options.target_mpp / slide.mpp  # level-0 px per target px
    cell = s * stride
    x0, y0, w, h = area.rect_level0
    gh, gw = max(1, math.ceil(h / cell - 1e-9)), max(1, math.ceil(w / cell - 1e-9))
    tissue = cell_tissue_fraction(area.tissue, x0, y0, cell, (gh, gw)) >= options.min_cell_tissue
    if not tissue.any():
        raise NoTissueError(f"region {area.name}: no tissue at {options.target_mpp} µm/px")
    rect = (x0, y0, gw * cell, gh * cell)
    # A region smaller than a tile is read as one tile of its own size: less padding, same features.
    tile_size = min(options.tile_size, max(gh, gw) * stride)
    grid = TileGrid(rect, options.target_mpp, slide.mpp, tile_size, halo, align=stride)
    cells_per_tile = tile_size // stride
    rgb = np.full((gh, gw, 3), 255, dtype=np.uint8)
    wanted = [
        t for t in grid
        if tissue[t.row * cells_per_tile : (t.row + 1) * cells_per_tile,
                  t.col * cells_per_tile : (t.col + 1) * cells_per_tile].any()
    ]
    with tempfile.TemporaryDirectory(prefix="equiseg-", dir=scratch_dir) as tmp:
        features = _feature_store(Path(tmp), (gh, gw, extractor.channels))
        done = 0
        for tiles, pixels in _batches(wanted, slide, options.target_mpp, extractor.batch_size):
            maps = extractor.extract(pixels, halo=halo)
            for tile, fmap, px in zip(tiles, maps, pixels, strict=True):
                r0, c0 = tile.row * cells_per_tile, tile.col * cells_per_tile
                r1, c1 = min(r0 + cells_per_tile, gh), min(c0 + cells_per_tile, gw)
                features[r0:r1, c0:c1] = fmap[: r1 - r0, : c1 - c0]
                interior = px[halo : halo + tile_size, halo : halo + tile_size]
                means = interior.reshape(cells_per_tile, stride, cells_per_tile, stride, 3).mean(axis=(1, 3))
                rgb[r0:r1, c0:c1] = np.round(means[: r1 - r0, : c1 - c0]).astype(np.uint8)
            done += len(tiles)
            progress(done, len(wanted), "tiles")
        try:
            yield RegionFeatures(area.name, features, tissue, rgb, x0, y0, cell, len(wanted))
        finally:
            del features


def segment_region(
    slide: Slide,
    area: RegionArea,
    extractor: Extractor,
    options: SegmentOptions,
    *,
    model: ClusterModel | None = None,
    feature_identity: dict[str, Any] | None = None,
    progress: ProgressCallback = no_progress,
    scratch_dir: str | Path | None = None,
) -> RegionSegmentation:
    """Segment one region: fit KMeans on it (intra mode) or apply `model` (a cohort model)."""
    with region_features(slide, area, extractor, options, progress=progress, scratch_dir=scratch_dir) as rf:
        if model is None:
            model = fit_region(
                rf.features, rf.tissue, rf.rgb, options.n_clusters, options.n_samples, options.seed,
                source=area.name, feature_identity=feature_identity,
            )
        labels = model.predict(rf.features, mask=rf.tissue)
    cell_um = options.target_mpp * extractor.stride
    min_cells = int(math.ceil(options.min_segment_um2 / (cell_um * cell_um)))
    if min_cells > 1:
        labels = remove_small_segments(labels, min_cells)
    return RegionSegmentation(area.name, labels, rf.rgb, rf.x0, rf.y0, rf.cell_level0, cell_um, model, rf.n_tiles)


def _feature_store(folder: Path, shape: tuple[int, int, int]) -> np.ndarray:
    nbytes = shape[0] * shape[1] * shape[2] * 4
    if nbytes <= IN_MEMORY_FEATURE_BYTES:
        return np.zeros(shape, dtype=np.float32)
    return np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float32, shape=shape)
