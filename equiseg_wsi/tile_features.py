"""A region's tiles through the network: which tiles (`plan_tiles`), and the features of a batch of them.

Why a module of its own: one function computes a batch's features wherever it runs, in this process or on a
Dask worker (`TileGroup`, `group_features`): a distributed run spreads the tiles of a large region over every
worker, and both give the same numbers as the in-process run.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from equiseg_wsi.context import fill_outside_tissue, tissue_pixels
from equiseg_wsi.errors import NoTissueError
from equiseg_wsi.features import FeatureIdentity, build_extractor
from equiseg_wsi.options import ExtractorSpec, SegmentOptions
from equiseg_wsi.polygons import Box, GridPlacement, cell_coverage
from equiseg_wsi.regions import RegionArea
from equiseg_wsi.slide import Slide, open_slide
from equiseg_wsi.tiling import Tile, TileGrid, read_tile
from equiseg_wsi.tissue import TissueMap

__all__ = ["TILES_PER_TASK", "Extractor", "GroupMapper", "RemoteTiles", "TileBatch", "TileGroup", "TilePlan",
           "cell_tissue_fraction", "group_features", "plan_tiles", "region_clip", "region_tile_side", "remote_tiles",
           "tile_batches"]

TILES_PER_TASK = 1  # tiles of one worker task: 1-4 s of network time on one CPU core (512-1,536 px tiles)


class Extractor(Protocol):
    """What segmentation needs of a feature extractor (see equiseg_wsi.features)."""

    stride: int
    alignment: int
    channels: int
    batch_size: int
    recommended_halo: int

    @property
    def feature_identity(self) -> FeatureIdentity: ...

    def extract(self, tiles: np.ndarray, halo: int = 0) -> np.ndarray: ...


def region_clip(slide: Slide, area: RegionArea) -> Box:
    """The region's box inside the image: its cell grid ends on a whole cell, the segments end here."""
    x, y, w, h = area.rect_level0
    return max(x, 0.0), max(y, 0.0), min(x + w, float(slide.width)), min(y + h, float(slide.height))


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


def region_tile_side(extent_px: int, max_side: int, align: int) -> int:
    """Tile interior for a region `extent_px` target px across (its longer side): as few tiles per side as
    `max_side` allows, shrunk to share the region evenly (a 1,300 px core is one 1,304 px tile, not nine of 512
    that each add a halo). Same features either way: the halo covers the receptive field."""
    n = max(1, math.ceil(extent_px / max_side))
    return max(align, math.ceil(math.ceil(extent_px / n) / align) * align)


@dataclass(frozen=True)
class TilePlan:
    """A region's feature-cell grid and the tiles that hold tissue cells, in reading order."""

    x0: float  # level-0 top-left of the cell grid
    y0: float
    cell_level0: float  # level-0 px per feature cell
    tissue: np.ndarray  # (gh, gw) bool: cells counted as tissue
    tile_size: int  # target px of a tile's interior
    halo: int
    tiles: tuple[Tile, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.tissue.shape[0], self.tissue.shape[1]


def plan_tiles(slide: Slide, area: RegionArea, extractor: Extractor, options: SegmentOptions) -> TilePlan:
    """The region's cell grid, its tissue cells, and the tiles that hold any (raises `NoTissueError` if none)."""
    stride = extractor.stride
    options.check_stride(extractor.alignment)
    halo = extractor.recommended_halo if options.halo is None else options.halo
    cell = options.target_mpp / slide.mpp * stride
    x0, y0, w, h = area.rect_level0
    gh, gw = max(1, math.ceil(h / cell - 1e-9)), max(1, math.ceil(w / cell - 1e-9))
    # a cell partly outside the region is judged by its part inside (it is exported clipped to that part)
    inside = cell_coverage((gh, gw), GridPlacement(x0, y0, cell), region_clip(slide, area))
    share = cell_tissue_fraction(area.tissue, x0, y0, cell, (gh, gw))
    tissue = (inside > 0) & (share >= options.min_cell_tissue * inside)
    if not tissue.any():
        raise NoTissueError(f"region {area.name}: no tissue at {options.target_mpp} µm/px")
    tile_size = region_tile_side(max(gh, gw) * stride, options.tile_size, extractor.alignment)
    grid = TileGrid((x0, y0, gw * cell, gh * cell), options.target_mpp, slide.mpp, tile_size, halo, align=stride)
    per = tile_size // stride
    wanted = tuple(t for t in grid if tissue[t.row * per:(t.row + 1) * per, t.col * per:(t.col + 1) * per].any())
    return TilePlan(x0, y0, cell, tissue, tile_size, halo, wanted)


@dataclass
class TileBatch:
    """Features and cell colours of some tiles: `maps` (n, per, per, C) float32 and `rgb` (n, per, per, 3) uint8
    for the tiles' interiors, `per` = tile_size / stride cells a side; seconds spent reading and in the network."""

    tiles: list[Tile]
    maps: np.ndarray
    rgb: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)


def _network_input(tiles: Sequence[Tile], pixels: np.ndarray, area: RegionArea, px_level0: float, glass: str
                   ) -> np.ndarray:
    """The tiles as the network sees them: as scanned, or with everything outside the region's tissue filled
    with its tissue colours (the cells' mean colours are always measured on the scanned pixels)."""
    if glass == "keep":
        return pixels
    out = np.empty_like(pixels)
    for i, (tile, px) in enumerate(zip(tiles, pixels, strict=True)):
        x, y = tile.halo_rect_level0[:2]
        out[i] = fill_outside_tissue(px, tissue_pixels(area.tissue, x, y, px_level0, px.shape[:2]))
    return out


def tile_batches(slide: Slide, area: RegionArea, tiles: Sequence[Tile], extractor: Extractor,
                 options: SegmentOptions, tile_size: int, halo: int) -> Iterator[TileBatch]:
    """`tiles` through the network, `extractor.batch_size` at a time, in order."""
    stride, per = extractor.stride, tile_size // extractor.stride
    px_level0 = options.target_mpp / slide.mpp
    for b0 in range(0, len(tiles), extractor.batch_size):
        batch = list(tiles[b0:b0 + extractor.batch_size])
        clock = time.perf_counter()
        pixels = np.stack([read_tile(slide, t, options.target_mpp) for t in batch])
        network_input = _network_input(batch, pixels, area, px_level0, options.glass)
        now = time.perf_counter()
        maps = extractor.extract(network_input, halo=halo)
        cnn = time.perf_counter() - now
        interior = pixels[:, halo:halo + tile_size, halo:halo + tile_size]
        means = interior.reshape(len(batch), per, stride, per, stride, 3).mean(axis=(2, 4))
        yield TileBatch(batch, maps, np.round(means).astype(np.uint8), {"read": now - clock, "cnn": cnn})


@dataclass(frozen=True)
class TileGroup:
    """Some of a region's tiles, with what a worker needs to compute their features on its own."""

    path: str  # the slide file, as the run opened it
    backend: str
    mpp: float | None  # µm/px given for the slide (manifest or --mpp), used when the file has none
    area: RegionArea
    tiles: tuple[Tile, ...]
    tile_size: int
    halo: int
    spec: ExtractorSpec
    options: SegmentOptions


def group_features(group: TileGroup) -> list[TileBatch]:
    """What a worker runs for a `TileGroup`: open the slide, the tiles' batches (the model is loaded once per
    process by `build_extractor`)."""
    extractor = build_extractor(group.spec)
    slide = _worker_slide(group.path, group.backend, group.mpp, _stamp(group.path))
    return list(tile_batches(slide, group.area, group.tiles, extractor, group.options, group.tile_size, group.halo))


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _worker_slide(path: str, backend: str, mpp: float | None, stamp: tuple[int, int]) -> Slide:
    """The slide a worker reads its groups from, opened once per process and file version: a plain image is
    decoded once, not once per group."""
    return open_slide(path, backend=backend, mpp=mpp)


# Runs `group_features` on each group somewhere (a Dask cluster) and yields the results in the groups' order.
GroupMapper = Callable[[Sequence[TileGroup]], Iterable[list[TileBatch]]]
# What `segment.region_features` calls for a region's tiles instead of computing them here.
RemoteTiles = Callable[[Slide, RegionArea, TilePlan], Iterable[TileBatch]]


def remote_tiles(mapper: GroupMapper, backend: str, mpp: float | None, spec: ExtractorSpec,
                 options: SegmentOptions) -> RemoteTiles:
    """A region's tiles, `TILES_PER_TASK` per task, through `mapper`, for slides opened with `backend`, `mpp`."""
    def run(slide: Slide, area: RegionArea, plan: TilePlan) -> Iterator[TileBatch]:
        groups = [TileGroup(str(slide.path), backend, mpp, area, plan.tiles[i:i + TILES_PER_TASK], plan.tile_size,
                            plan.halo, spec, options) for i in range(0, len(plan.tiles), TILES_PER_TASK)]
        for batches in mapper(groups):
            yield from batches
    return run
