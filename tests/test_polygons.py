"""Label map -> polygons: exact areas, shared borders, placement, validity after QuPath's 0.01 px snapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from scipy import ndimage
from shapely.geometry import MultiPolygon, box

from equiseg_wsi.polygons import (
    GridPlacement,
    PolygonError,
    label_map_to_polygons,
    polygon_vertex_count,
    remove_small_segments,
    snap_valid,
    tissue_outline,
)

DATA = Path(__file__).parent / "data"
FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def grey_label_map(rgb: np.ndarray) -> np.ndarray:
    """A 3-cluster label map from grey levels: bright = background 0, then tertiles of the tissue's grey."""
    grey = rgb.astype(np.float32).mean(axis=2)
    tissue = grey < 200
    t1, t2 = np.percentile(grey[tissue], [33, 66])
    labels = np.zeros(grey.shape, np.int32)
    labels[tissue] = 1 + (grey[tissue] >= t1).astype(np.int32) + (grey[tissue] >= t2).astype(np.int32)
    return labels


@pytest.fixture(scope="module")
def real_labels() -> np.ndarray:
    """Real H&E (CC0 CMU-1-Small-Region crop, 256 x 256) thresholded into background + 3 clusters."""
    rgb = np.asarray(Image.open(DATA / "cmu1_small_region_x4_crop256.png").convert("RGB"))
    labels = grey_label_map(rgb)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    return labels


@pytest.fixture(scope="module")
def real_clean(real_labels: np.ndarray) -> np.ndarray:
    return remove_small_segments(real_labels, 16)


PLACEMENT = GridPlacement(x0=10240.37, y0=5120.81, cell=7.99)


def pairwise_overlap(polys: dict[int, MultiPolygon]) -> float:
    geoms = list(polys.values())
    return sum(geoms[i].intersection(geoms[j]).area for i in range(len(geoms)) for j in range(i + 1, len(geoms)))


def components_of(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    out = []
    for lab in np.unique(labels):
        if lab == 0:
            continue
        cl, n = ndimage.label(labels == lab, structure=FOUR)
        out += [(int(lab), cl == i) for i in range(1, n + 1)]
    return out


def has_tissue_neighbour(labels: np.ndarray, mask: np.ndarray) -> bool:
    ring = ndimage.binary_dilation(mask, structure=FOUR) & ~mask
    return bool((labels[ring] > 0).any())


# ------------------------------------------------------------------------------------------------ placement


def test_single_pixel_lands_at_its_level0_square() -> None:
    labels = np.zeros((5, 7), np.int32)
    labels[2, 3] = 4
    pl = GridPlacement(x0=100.25, y0=-50.5, cell=4.0)
    polys = label_map_to_polygons(labels, pl)
    assert list(polys) == [4]
    expected = box(100.25 + 3 * 4, -50.5 + 2 * 4, 100.25 + 4 * 4, -50.5 + 3 * 4)
    assert polys[4].symmetric_difference(expected).area == pytest.approx(0.0, abs=1e-6)
    assert polys[4].bounds == pytest.approx(expected.bounds, abs=0.005)


def test_non_integer_cell_and_offset() -> None:
    labels = np.zeros((4, 4), np.int32)
    labels[1:3, 0:2] = 1
    pl = GridPlacement(x0=0.5, y0=1000.0, cell=2.5)
    poly = label_map_to_polygons(labels, pl)[1]
    assert poly.bounds == pytest.approx((0.5, 1002.5, 5.5, 1007.5))
    assert poly.area == pytest.approx(4 * 2.5**2)


def test_grid_placement_is_checked_and_frozen() -> None:
    pl = GridPlacement(1, 2, 3)
    assert (pl.x0, pl.y0, pl.cell) == (1.0, 2.0, 3.0)
    assert pl.to_level0(2, 1) == (7.0, 5.0)
    assert pl.bounds((10, 20)) == (1.0, 2.0, 61.0, 32.0)
    with pytest.raises(AttributeError):
        pl.x0 = 5.0  # type: ignore[misc]
    for bad in [(0, 0, 0), (0, 0, -1), (float("nan"), 0, 1), (0, float("inf"), 1)]:
        with pytest.raises(PolygonError):
            GridPlacement(*bad)


def test_bad_label_maps_are_refused() -> None:
    pl = GridPlacement(0, 0, 1)
    with pytest.raises(PolygonError):
        label_map_to_polygons(np.zeros((2, 2, 2), np.int32), pl)
    with pytest.raises(PolygonError):
        label_map_to_polygons(np.full((2, 2), -1, np.int32), pl)
    with pytest.raises(PolygonError):
        label_map_to_polygons(np.zeros((2, 2), np.float32), pl)
    with pytest.raises(PolygonError):
        label_map_to_polygons(np.ones((2, 2), np.int32), pl, simplify_tolerance=-1)


def test_empty_label_map() -> None:
    pl = GridPlacement(0, 0, 1)
    assert label_map_to_polygons(np.zeros((8, 8), np.int32), pl) == {}
    assert tissue_outline(np.zeros((8, 8), np.int32), pl).is_empty


# ------------------------------------------------------------------------------------------------ topology


def test_holes_are_interior_rings() -> None:
    labels = np.ones((9, 9), np.int32)
    labels[2:4, 2:4] = 2  # a hole filled by another cluster
    labels[5:7, 5:7] = 0  # a hole of background
    polys = label_map_to_polygons(labels, GridPlacement(0, 0, 1), 0)
    outer = polys[1]
    assert len(outer.geoms) == 1
    assert len(outer.geoms[0].interiors) == 2
    assert outer.area == 81 - 8
    assert polys[2].equals(box(2, 2, 4, 4))
    hole_areas = sorted(shapely.Polygon(r).area for r in outer.geoms[0].interiors)
    assert hole_areas == [4.0, 4.0]


def test_diagonal_pixels_are_separate_parts_and_valid() -> None:
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.int32)
    polys = label_map_to_polygons(labels, GridPlacement(0, 0, 1))
    assert len(polys[1].geoms) == 5
    assert polys[1].is_valid
    assert polys[1].area == 5


def test_random_maps_exact_areas_no_overlap() -> None:
    """Noise maps are the hardest topology: pinches, diagonal contacts, nested islands."""
    rng = np.random.default_rng(0)
    pl = GridPlacement(3.0, 5.0, 2.0)
    for _ in range(15):
        labels = rng.integers(0, 4, size=(24, 24)).astype(np.int32)
        polys = label_map_to_polygons(labels, pl, 0, snap=False)
        for k, g in polys.items():
            assert g.is_valid
            assert g.area / pl.cell**2 == (labels == k).sum()
        assert pairwise_overlap(polys) == 0
        snapped = label_map_to_polygons(labels, pl)
        assert all(g.is_valid for g in snapped.values())


def test_real_map_exact_areas_before_simplification(real_labels: np.ndarray) -> None:
    polys = label_map_to_polygons(real_labels, GridPlacement(0.0, 0.0, 4.0), 0, snap=False)
    assert list(polys) == [1, 2, 3]
    for k, g in polys.items():
        assert g.area / 16.0 == (real_labels == k).sum()
    # With an awkward placement and snapping the areas still agree to float/snap precision.
    snapped = label_map_to_polygons(real_labels, PLACEMENT, 0)
    for k, g in snapped.items():
        assert g.area / PLACEMENT.cell**2 == pytest.approx((real_labels == k).sum(), rel=1e-4)


def test_real_map_simplified_coverage(real_clean: np.ndarray) -> None:
    """The acceptance rules of issue 4 on real tissue: areas < 1%, overlaps < 0.1%, union = tissue < 1%."""
    polys = label_map_to_polygons(real_clean, PLACEMENT)
    cell2 = PLACEMENT.cell**2
    tissue_cells = int((real_clean > 0).sum())
    for k, g in polys.items():
        count = (real_clean == k).sum()
        assert abs(g.area / cell2 - count) / count < 0.01, k
        assert g.is_valid
        assert shapely.set_precision(g, 0.01, mode="pointwise").is_valid
        coords = shapely.get_coordinates(g)
        assert np.allclose(coords * 100, np.round(coords * 100), atol=1e-6), "not on the 0.01 grid"
    assert pairwise_overlap(polys) / cell2 < 0.001 * tissue_cells
    exact_tissue = tissue_outline(real_clean, PLACEMENT, 0)
    outline = tissue_outline(real_clean, PLACEMENT, polygons=polys)
    assert outline.is_valid
    assert outline.symmetric_difference(exact_tissue).area / cell2 < 0.01 * tissue_cells
    union = shapely.union_all(list(polys.values()))
    assert union.symmetric_difference(exact_tissue).area / cell2 < 0.01 * tissue_cells
    assert outline.symmetric_difference(union).area / cell2 < 1e-3 * tissue_cells


def test_simplify_boundary_option_still_a_coverage(real_clean: np.ndarray) -> None:
    polys = label_map_to_polygons(real_clean, PLACEMENT, 1.0, simplify_boundary=True)
    cell2 = PLACEMENT.cell**2
    assert pairwise_overlap(polys) / cell2 < 0.001 * (real_clean > 0).sum()
    assert all(g.is_valid for g in polys.values())


def test_simplification_reduces_vertices(real_clean: np.ndarray) -> None:
    exact = label_map_to_polygons(real_clean, PLACEMENT, 0)
    simple = label_map_to_polygons(real_clean, PLACEMENT)
    n_exact = sum(polygon_vertex_count(g) for g in exact.values())
    n_simple = sum(polygon_vertex_count(g) for g in simple.values())
    assert n_simple < 0.85 * n_exact
    # Sane for QuPath: well under one vertex per cell.
    assert n_simple < 0.3 * real_clean.size


def test_outline_matches_with_or_without_precomputed(real_clean: np.ndarray) -> None:
    a = tissue_outline(real_clean, PLACEMENT)
    b = tissue_outline(real_clean, PLACEMENT, polygons=label_map_to_polygons(real_clean, PLACEMENT))
    assert a.equals(b)


def test_shared_border_is_identical_on_both_sides() -> None:
    """An oblique border, simplified: the two labels still meet exactly (no sliver either way)."""
    yy, xx = np.mgrid[0:60, 0:80]
    labels = np.where(yy * 3 < xx * 2 + 7, 1, 2).astype(np.int32)
    labels[:, :5] = 0
    polys = label_map_to_polygons(labels, PLACEMENT, 2.0)
    assert polys[1].intersection(polys[2]).area < 1e-6
    total = (polys[1].area + polys[2].area) / PLACEMENT.cell**2
    assert total == pytest.approx((labels > 0).sum(), rel=1e-6)
    shared = polys[1].boundary.intersection(polys[2].boundary)
    assert shared.length > 50 * PLACEMENT.cell


def test_snap_valid_repairs_or_raises() -> None:
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    fixed = snap_valid(bowtie)
    assert fixed.is_valid and fixed.area == pytest.approx(50)
    sliver = shapely.Polygon([(0, 0), (10, 0.001), (20, 0)])  # collapses on the 0.01 grid
    assert snap_valid(sliver).is_empty or snap_valid(sliver).is_valid


# ------------------------------------------------------------------------------------------- small segments


def test_small_island_joins_its_surrounding_label() -> None:
    labels = np.ones((10, 10), np.int32)
    labels[4:6, 4:5] = 2
    out = remove_small_segments(labels, 3)
    assert (out == 1).all()
    assert labels[4, 4] == 2  # input untouched


def test_small_component_takes_longest_border() -> None:
    labels = np.zeros((6, 8), np.int32)
    labels[:, :3] = 1
    labels[:, 4:] = 3
    labels[2:4, 3] = 2  # 2 cells: borders 1 on the left (2 edges) and 3 on the right (2 edges) + ...
    labels[1, 3] = 3  # ... make label 3 share one more edge
    out = remove_small_segments(labels, 3)
    assert (out[2:4, 3] == 3).all()


def test_isolated_fleck_keeps_its_label_and_background_is_untouched() -> None:
    labels = np.zeros((10, 10), np.int32)
    labels[1:8, 1:8] = 1
    labels[9, 9] = 2  # isolated by background
    labels[3, 3] = 0  # a background hole stays a hole
    out = remove_small_segments(labels, 5)
    assert out[9, 9] == 2
    assert out[3, 3] == 0
    assert ((out > 0) == (labels > 0)).all()


def test_chains_of_small_components_converge() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(1, 5, size=(40, 40)).astype(np.int32)
    out = remove_small_segments(labels, 20)
    assert (out > 0).all()
    for _lab, mask in components_of(out):
        assert mask.sum() >= 20


def test_real_map_small_segment_rules(real_labels: np.ndarray, real_clean: np.ndarray) -> None:
    min_cells = 16
    assert ((real_clean > 0) == (real_labels > 0)).all(), "tissue area and holes must be unchanged"
    for _lab, mask in components_of(real_clean):
        if mask.sum() < min_cells:
            assert not has_tissue_neighbour(real_clean, mask)
    again = remove_small_segments(real_labels, min_cells)
    assert np.array_equal(again, real_clean), "deterministic"
    assert np.array_equal(remove_small_segments(real_clean, min_cells), real_clean), "stable"
    assert len(components_of(real_clean)) < len(components_of(real_labels)) / 5


def test_min_cells_one_is_identity(real_labels: np.ndarray) -> None:
    out = remove_small_segments(real_labels, 1)
    assert np.array_equal(out, real_labels) and out is not real_labels
    assert out.dtype == np.int32


# ------------------------------------------------------------------------------------ exact copies, snapping


@pytest.mark.parametrize("placement", [GridPlacement(x0=2048.0, y0=512.0, cell=4.0), PLACEMENT])
def test_integer_placement_needs_no_snapping_and_gives_what_snapping_gives(
    real_clean: np.ndarray, placement: GridPlacement, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An integer cell and offset scale traced (integer) vertices exactly, already on QuPath's 0.01 px grid: the
    segments skip `snap_valid` and still equal, vertex for vertex, what snapping them gives."""
    import equiseg_wsi.polygons as polygons

    raw = label_map_to_polygons(real_clean, placement, 0, snap=False)
    expected = {k: snap_valid(g) for k, g in raw.items()}
    calls: list[int] = []
    real_snap = polygons.snap_valid
    monkeypatch.setattr(polygons, "snap_valid", lambda g, *a: calls.append(1) or real_snap(g, *a))
    got = label_map_to_polygons(real_clean, placement, 0)
    assert list(got) == list(expected)
    for k in got:
        assert shapely.get_coordinates(got[k]).tolist() == shapely.get_coordinates(expected[k]).tolist()
        assert got[k].is_valid
    integer = placement.cell.is_integer() and placement.x0.is_integer() and placement.y0.is_integer()
    assert len(calls) == (0 if integer else len(expected))


def test_a_clipped_segment_is_snapped_again() -> None:
    labels = np.ones((4, 4), np.int32)
    labels[:, 2:] = 2
    clip = (0.0, 0.0, 16.0, 10.005)  # cuts label 1 and 2 off the 0.01 px grid
    polys = label_map_to_polygons(labels, GridPlacement(0.0, 0.0, 4.0), 0, clip=clip)
    for g in polys.values():
        coords = shapely.get_coordinates(g)
        assert np.allclose(coords * 100, np.round(coords * 100)) and g.is_valid
        assert g.bounds[3] == pytest.approx(10.01, abs=1e-9) or g.bounds[3] == pytest.approx(10.0, abs=1e-9)


# ------------------------------------------------------------------------------- compiled merge passes


def reference_components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The NumPy form the compiled pass replaced: `ndimage.label` per label, numbered label by label."""
    comp = np.zeros(labels.shape, dtype=np.int64)
    comp_label, offset = [0], 0
    for lab in np.unique(labels):
        if lab == 0:
            continue
        cl, n = ndimage.label(labels == lab, structure=FOUR)
        comp[cl > 0] = cl[cl > 0] + offset
        comp_label += [int(lab)] * n
        offset += n
    return comp, np.asarray(comp_label, dtype=np.int64)


def reference_borders(comp: np.ndarray, n: int) -> dict[int, int]:
    a = np.concatenate([comp[:, :-1].ravel(), comp[:-1, :].ravel()])
    b = np.concatenate([comp[:, 1:].ravel(), comp[1:, :].ravel()])
    keep = (a != b) & (a > 0) & (b > 0)
    keys, counts = np.unique(np.minimum(a[keep], b[keep]) * (n + 1) + np.maximum(a[keep], b[keep]),
                             return_counts=True)
    return dict(zip(keys.tolist(), counts.tolist(), strict=True))


def awkward_maps() -> list[np.ndarray]:
    """Shapes that stress union-find: a spiral, a comb joined at its foot, a staircase, a checkerboard."""
    spiral = np.zeros((41, 41), np.int32)
    y, x, dy, dx, step = 20, 20, 0, 1, 1
    while 0 <= y < 41 and 0 <= x < 41:
        for _ in range(2):
            for _ in range(step):
                if 0 <= y < 41 and 0 <= x < 41:
                    spiral[y, x] = 1
                y, x = y + dy, x + dx
            dy, dx = dx, -dy
        step += 2
    comb = np.zeros((30, 61), np.int32)
    comb[:, ::2] = 2
    comb[-1] = 2
    stairs = (np.add.outer(np.arange(40), np.arange(40)) // 3 % 3).astype(np.int32)
    checker = (np.indices((25, 33)).sum(axis=0) % 2 + 1).astype(np.int32)
    return [spiral, comb, comb[::-1, ::-1].copy(), stairs, checker, stairs.T.copy()]


def test_compiled_components_and_borders_equal_the_ndimage_form(real_labels: np.ndarray) -> None:
    from equiseg_wsi.polygons import _adjacency, _components

    rng = np.random.default_rng(7)
    maps = [real_labels, real_labels[::-1].copy(), np.zeros((4, 6), np.int32), np.full((1, 9), 3, np.int32)]
    maps += awkward_maps()
    maps += [rng.integers(0, int(rng.integers(2, 7)), tuple(rng.integers(1, 50, 2))).astype(np.int32)
             for _ in range(30)]
    for labels in maps:
        comp, comp_label = _components(labels)
        ref, ref_label = reference_components(labels)
        assert np.array_equal(comp, ref) and np.array_equal(comp_label, ref_label)
        n = len(ref_label) - 1
        adj = _adjacency(comp, n)
        flat = {min(i, j) * (n + 1) + max(i, j): w for i, row in enumerate(adj) for j, w in row.items()}
        assert flat == reference_borders(ref, n)
