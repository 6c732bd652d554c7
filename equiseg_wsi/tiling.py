"""A streaming tile grid over a level-0 rectangle at a target µm/px, with a halo of context around each tile.

The grid is defined in level-0 coordinates only: its origin is the rectangle's top-left corner and one target
pixel spans s = mpp / slide_mpp level-0 px. Reads go through `Slide.read_region`, which maps output pixel
(r, c) to level-0 [x + c*s, x + (c+1)*s) whichever pyramid level serves it, so the grid (and every tile's
pixels, up to resampling) is the same on any pyramid. Tiles are yielded one at a time; nothing holds the
pixel data of more than one tile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from equiseg_wsi.slide import Slide
    from equiseg_wsi.tissue import TissueMap

__all__ = ["Tile", "TileGrid", "read_tile"]

Rect = tuple[float, float, float, float]


@dataclass(frozen=True)
class Tile:
    """One tile: grid `row`/`col`; interior top-left (`x_px`, `y_px`) in grid (target) px; level-0 rectangles.

    `rect_level0` is the interior (x, y, w, h), `halo_rect_level0` the interior plus halo; `tissue_fraction`
    is the share of the interior covered by the tissue mask (1.0 when the grid has no mask).
    """

    row: int
    col: int
    x_px: int
    y_px: int
    size: int
    halo: int
    rect_level0: Rect
    halo_rect_level0: Rect
    tissue_fraction: float


def _overlap_weights(n_cells: int, cell: float, lo: float, hi: float) -> tuple[int, np.ndarray]:
    """(first index, weights): the share of each mask cell [i*cell, (i+1)*cell) that [lo, hi) covers."""
    i0 = max(0, math.floor(lo / cell))
    i1 = min(n_cells, math.ceil(hi / cell))
    if i1 <= i0:
        return 0, np.zeros(0)
    starts = np.arange(i0, i1) * cell
    w = np.clip(np.minimum(starts + cell, hi) - np.maximum(starts, lo), 0, None) / cell
    return i0, w


class TileGrid:
    """Tiles of `tile_size` target px (+ `halo` on each side) over `rect_level0` (x, y, w, h) at `mpp` µm/px.

    `slide_mpp` is the level-0 µm/px. The grid is `width_px` x `height_px` target px (ceil of the extent / s),
    cut into `n_rows` x `n_cols` tiles (the last row/column may overhang; outside the slide reads as white).
    With a `tissue` map, only tiles whose interior is covered at least `min_tissue` (0–1) are yielded;
    `min_tissue=0` keeps tiles touching any tissue. `tile_size` must be a multiple of `align` so per-tile
    feature maps at stride `align` land on whole cells of a region map.
    """

    def __init__(
        self,
        rect_level0: Rect,
        mpp: float,
        slide_mpp: float,
        tile_size: int,
        halo: int = 0,
        *,
        tissue: TissueMap | None = None,
        min_tissue: float = 0.0,
        align: int = 8,
    ) -> None:
        if mpp <= 0 or slide_mpp <= 0:
            raise ValueError("mpp and slide_mpp must be positive")
        if tile_size <= 0 or align <= 0 or tile_size % align:
            raise ValueError(f"tile_size {tile_size} must be a positive multiple of align {align}")
        if halo < 0:
            raise ValueError("halo must be >= 0")
        if not 0.0 <= min_tissue <= 1.0:
            raise ValueError("min_tissue must be in [0, 1]")
        x, y, w, h = (float(v) for v in rect_level0)
        if w <= 0 or h <= 0:
            raise ValueError(f"empty rectangle {rect_level0}")
        self.rect_level0: Rect = (x, y, w, h)
        self.mpp = float(mpp)
        self.scale = self.mpp / float(slide_mpp)  # level-0 px per target px
        self.tile_size = int(tile_size)
        self.halo = int(halo)
        self.align = int(align)
        self.tissue = tissue
        self.min_tissue = float(min_tissue)
        eps = 1e-9
        self.width_px = max(1, math.ceil(w / self.scale - eps))
        self.height_px = max(1, math.ceil(h / self.scale - eps))
        self.n_cols = math.ceil(self.width_px / self.tile_size)
        self.n_rows = math.ceil(self.height_px / self.tile_size)
        self._n_tiles: int | None = None

    def _tile(self, row: int, col: int) -> Tile:
        x0, y0, _, _ = self.rect_level0
        s, t, hl = self.scale, self.tile_size, self.halo
        x_px, y_px = col * t, row * t
        rect = (x0 + x_px * s, y0 + y_px * s, t * s, t * s)
        halo_rect = (rect[0] - hl * s, rect[1] - hl * s, (t + 2 * hl) * s, (t + 2 * hl) * s)
        return Tile(row, col, x_px, y_px, t, hl, rect, halo_rect, self._coverage(rect))

    def _coverage(self, rect: Rect) -> float:
        """Area-weighted share of `rect` (level-0) covered by the tissue mask; 1.0 without a mask."""
        if self.tissue is None:
            return 1.0
        mask, cell = self.tissue.mask, self.tissue.px_level0
        x, y, w, h = rect
        c0, wx = _overlap_weights(mask.shape[1], cell, x, x + w)
        r0, wy = _overlap_weights(mask.shape[0], cell, y, y + h)
        if not wx.size or not wy.size:
            return 0.0
        covered = wy @ mask[r0 : r0 + wy.size, c0 : c0 + wx.size].astype(np.float64) @ wx
        return float(covered * cell * cell / (w * h))

    def _keep(self, tile: Tile) -> bool:
        if self.tissue is None:
            return True
        if self.min_tissue <= 0.0:
            return tile.tissue_fraction > 0.0
        return tile.tissue_fraction >= self.min_tissue - 1e-12

    def __iter__(self) -> Iterator[Tile]:
        """Kept tiles in row-major order, computed lazily."""
        for row in range(self.n_rows):
            for col in range(self.n_cols):
                tile = self._tile(row, col)
                if self._keep(tile):
                    yield tile

    @property
    def n_tiles(self) -> int:
        """Number of tiles the grid yields (tissue filter applied; no pixels read), for progress bars."""
        if self._n_tiles is None:
            self._n_tiles = sum(1 for _ in self)
        return self._n_tiles

    def __len__(self) -> int:
        return self.n_tiles

    @classmethod
    def for_slide(
        cls,
        slide: Slide,
        mpp: float,
        tile_size: int,
        halo: int = 0,
        *,
        rect_level0: Rect | None = None,
        tissue: TissueMap | None = None,
        min_tissue: float = 0.0,
        align: int = 8,
    ) -> TileGrid:
        """The grid over `rect_level0` (default: the whole slide) at `mpp` µm/px of `slide`."""
        rect = rect_level0 if rect_level0 is not None else (0.0, 0.0, float(slide.width), float(slide.height))
        return cls(rect, mpp, slide.mpp, tile_size, halo, tissue=tissue, min_tissue=min_tissue, align=align)

    def __repr__(self) -> str:
        return (
            f"TileGrid({self.n_rows}x{self.n_cols} tiles of {self.tile_size}+2*{self.halo} px at {self.mpp} µm/px, "
            f"grid {self.width_px}x{self.height_px} px)"
        )


def read_tile(slide: Slide, tile: Tile, mpp: float | None = None) -> np.ndarray:
    """RGB uint8 (size + 2*halo, size + 2*halo, 3) of the tile with its halo, in one `read_region` call.

    `mpp` defaults to the grid's (derived from the tile's level-0 size and the slide's mpp).
    """
    side = tile.size + 2 * tile.halo
    x, y, w, _ = tile.halo_rect_level0
    target_mpp = mpp if mpp is not None else w / side * slide.mpp
    return slide.read_region(x, y, side, side, target_mpp)
