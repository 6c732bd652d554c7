"""Tile grid: exact level-0 cover, same grid on any pyramid, tissue filter, halo reads."""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest

from equiseg_wsi.slide import open_slide
from equiseg_wsi.testing.slide_writer import write_aperio_pyramid
from equiseg_wsi.tiling import TileGrid, read_tile
from equiseg_wsi.tissue import TissueMap, detect_tissue


@pytest.fixture(scope="module")
def flat_svs(tmp_path_factory: pytest.TempPathFactory, sample_rgb: np.ndarray) -> Path:
    """The same 1024 x 1536 crop as `pyramid_svs`, but a single level."""
    path = tmp_path_factory.mktemp("flat") / "flat.svs"
    write_aperio_pyramid(path, np.ascontiguousarray(sample_rgb[:1536, :1024]), mpp=0.499, n_levels=1)
    return path


def test_rectangles_tile_the_region_exactly() -> None:
    rect = (100.5, 37.0, 1000.0, 777.0)
    grid = TileGrid(rect, mpp=2.0, slide_mpp=0.5, tile_size=64, halo=8)
    s = 4.0
    assert (grid.width_px, grid.height_px) == (math.ceil(1000 / s), math.ceil(777 / s))
    assert (grid.n_cols, grid.n_rows) == (math.ceil(250 / 64), math.ceil(195 / 64))
    tiles = list(grid)
    assert len(tiles) == grid.n_tiles == grid.n_rows * grid.n_cols
    for t in tiles:
        x, y, w, h = t.rect_level0
        assert (w, h) == (64 * s, 64 * s)
        assert x == pytest.approx(rect[0] + t.col * 64 * s) and y == pytest.approx(rect[1] + t.row * 64 * s)
        assert (t.x_px, t.y_px) == (t.col * 64, t.row * 64)
        hx, hy, hw, hh = t.halo_rect_level0
        assert (hx, hy, hw, hh) == pytest.approx((x - 8 * s, y - 8 * s, 80 * s, 80 * s))
    # No gap, no overlap: each tile starts where its left/top neighbour ends; the grid covers the rectangle.
    by_pos = {(t.row, t.col): t for t in tiles}
    for (r, c), t in by_pos.items():
        if c:
            left = by_pos[(r, c - 1)].rect_level0
            assert t.rect_level0[0] == pytest.approx(left[0] + left[2])
        if r:
            up = by_pos[(r - 1, c)].rect_level0
            assert t.rect_level0[1] == pytest.approx(up[1] + up[3])
    last = by_pos[(grid.n_rows - 1, grid.n_cols - 1)].rect_level0
    assert rect[0] + rect[2] <= last[0] + last[2] < rect[0] + rect[2] + 64 * s
    assert rect[1] + rect[3] <= last[1] + last[3] < rect[1] + rect[3] + 64 * s


def test_grid_is_a_generator_and_validates() -> None:
    grid = TileGrid((0, 0, 500, 500), 1.0, 0.5, tile_size=32)
    assert isinstance(iter(grid), types.GeneratorType)
    with pytest.raises(ValueError, match="multiple"):
        TileGrid((0, 0, 500, 500), 1.0, 0.5, tile_size=100)
    TileGrid((0, 0, 500, 500), 1.0, 0.5, tile_size=100, align=4)
    with pytest.raises(ValueError):
        TileGrid((0, 0, 0, 500), 1.0, 0.5, tile_size=32)
    with pytest.raises(ValueError):
        TileGrid((0, 0, 10, 10), 1.0, 0.5, tile_size=32, halo=-1)


def test_same_grid_whatever_level(pyramid_svs: Path, flat_svs: Path) -> None:
    """At 2 µm/px the pyramid serves reads from its 4x level, the flat file from level 0: same grid, same pixels."""
    with open_slide(pyramid_svs) as pyr, open_slide(flat_svs) as flat:
        assert len(pyr.levels) == 3 and len(flat.levels) == 1
        assert pyr.best_level(2.0 / pyr.mpp) == 2
        g1 = TileGrid.for_slide(pyr, 2.0, tile_size=96, halo=16)
        g2 = TileGrid.for_slide(flat, 2.0, tile_size=96, halo=16)
        t1, t2 = list(g1), list(g2)
        assert [(t.row, t.col, t.rect_level0, t.halo_rect_level0) for t in t1] == [
            (t.row, t.col, t.rect_level0, t.halo_rect_level0) for t in t2
        ]
        diffs = []
        for a, b in zip(t1, t2, strict=True):
            pa, pb = read_tile(pyr, a).astype(int), read_tile(flat, b).astype(int)
            assert pa.shape == pb.shape == (128, 128, 3)
            aligned = np.abs(pa - pb).mean()
            # Any one-pixel shift (one pixel of the 4x level) matches worse than the aligned reads.
            for shifted in (np.abs(pa[:, 1:] - pb[:, :-1]), np.abs(pa[:, :-1] - pb[:, 1:]),
                            np.abs(pa[1:] - pb[:-1]), np.abs(pa[:-1] - pb[1:])):
                assert aligned < shifted.mean()
            diffs.append(aligned)
        # What remains is the pyramid's own 2x2 averaging and JPEG, not a shifted grid.
        assert np.median(diffs) < 4.0 and max(diffs) < 10.0


def test_halo_reads(flat_svs: Path) -> None:
    """At native resolution a tile's halo holds exactly its neighbours' pixels."""
    with open_slide(flat_svs) as slide:
        grid = TileGrid.for_slide(slide, slide.mpp, tile_size=128, halo=16, rect_level0=(64, 64, 512, 512))
        tiles = {(t.row, t.col): t for t in grid}
        a, b = read_tile(slide, tiles[(0, 0)]), read_tile(slide, tiles[(0, 1)])
        assert a.shape == (160, 160, 3)
        full = slide.read_level(0, 0, 0, slide.width, slide.height)
        assert np.array_equal(a, full[64 - 16 : 64 + 144, 64 - 16 : 64 + 144])
        # b's left halo (16 px) is a's last 16 interior columns.
        assert np.array_equal(b[:, :16], a[:, 128:144])
        # A tile whose halo leaves the slide reads white there.
        corner = read_tile(slide, next(iter(TileGrid.for_slide(slide, slide.mpp, tile_size=64, halo=8))))
        assert (corner[:8] == 255).all() and (corner[:, :8] == 255).all()


def test_tissue_filter_exact_fractions() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half of a 100 x 100 level-0 px area (mask cell = 10 px)
    tissue = TissueMap(mask=mask, mpp=5.0, px_level0=10.0, tissue_fraction=0.5)
    grid = TileGrid((0, 0, 100, 100), 1.0, 0.5, tile_size=16, tissue=tissue, min_tissue=0.0)  # 32 px tiles
    fractions = {(t.row, t.col): t.tissue_fraction for t in TileGrid((0, 0, 100, 100), 1.0, 0.5, tile_size=16)}
    assert set(fractions.values()) == {1.0}  # no mask: every tile kept
    kept = {(t.row, t.col): t.tissue_fraction for t in grid}
    # Columns: [0,32) inside, [32,64) covers 50..64 -> 18/32 tissue, [64,96) none, [96,128) none.
    assert {c for _, c in kept} == {0, 1}
    assert kept[(0, 0)] == pytest.approx(1.0)
    assert kept[(0, 1)] == pytest.approx(18 / 32)
    half = TileGrid((0, 0, 100, 100), 1.0, 0.5, tile_size=16, tissue=tissue, min_tissue=0.6)
    # Row 3 overhangs the mask (y 96..128, mask ends at 100): 4/32 tissue, dropped.
    assert {(t.row, t.col) for t in half} == {(r, 0) for r in range(3)} and half.n_tiles == 3


def test_tissue_filter_on_real_slide(sample_svs: Path) -> None:
    with open_slide(sample_svs) as slide:
        tissue = detect_tissue(slide)
        all_tiles = TileGrid.for_slide(slide, 2.0, tile_size=128)
        some = TileGrid.for_slide(slide, 2.0, tile_size=128, tissue=tissue, min_tissue=0.5)
        assert 0 < some.n_tiles < all_tiles.n_tiles
        assert all(t.tissue_fraction >= 0.5 for t in some)
        # Kept tiles really hold tissue: their pixels are far from glass white.
        t = max(some, key=lambda t: t.tissue_fraction)
        assert read_tile(slide, t).mean() < 200
