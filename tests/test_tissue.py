"""Tissue detection on real H&E: partial, full and no cover; debris, holes and lumina; level-0 outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from equiseg_wsi.errors import MppUnknownError
from equiseg_wsi.slide import open_slide
from equiseg_wsi.tissue import TissueMap, detect_tissue, tissue_mask

REPO = Path(__file__).resolve().parents[1]
CRC_TILE = REPO / "tests" / "data" / "CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif"
CORES = REPO / "sample_data" / "cores"
sys.path.insert(0, str(REPO / "sample_data"))
from make_sample_data import TRUE_TISSUE_FRACTION  # noqa: E402


@pytest.fixture(scope="module")
def cmu_map(sample_svs: Path) -> TissueMap:
    with open_slide(sample_svs) as slide:
        return detect_tissue(slide)


def _stroma(shape: tuple[int, int]) -> np.ndarray:
    """A textured pink H&E-like field (deterministic)."""
    rng = np.random.default_rng(0)
    base = np.array([214, 140, 190], np.float64)
    return np.clip(base + rng.normal(0, 12, (*shape, 3)), 0, 255).astype(np.uint8)


def test_cc0_region_partial_cover(cmu_map: TissueMap, sample_svs: Path) -> None:
    # The skin strip covers a bit under 40% of the region (checked by eye on the 4 µm/px thumbnail).
    assert 0.33 < cmu_map.tissue_fraction < 0.43
    assert cmu_map.mpp == 8.0
    with open_slide(sample_svs) as slide:
        assert cmu_map.px_level0 == pytest.approx(8.0 / slide.mpp)
        expected = (round(slide.height / cmu_map.px_level0), round(slide.width / cmu_map.px_level0))
    assert cmu_map.mask.shape == expected and cmu_map.mask.dtype == bool


def test_cc0_regions_and_polygons(cmu_map: TissueMap) -> None:
    regions = cmu_map.regions
    assert regions and [r.name for r in regions] == [f"region-{i:03d}" for i in range(1, len(regions) + 1)]
    tops = [(r.bbox_level0[1], r.bbox_level0[0]) for r in regions]
    assert tops == sorted(tops)
    total = sum(r.area_um2 for r in regions)
    assert total == pytest.approx(cmu_map.mask.sum() * 64.0)
    biggest = max(regions, key=lambda r: r.area_um2)
    assert biggest.mask_crop.shape == (biggest.bbox_mask[3], biggest.bbox_mask[2])
    geom = cmu_map.polygons_level0()
    assert geom.is_valid
    # Polygon area in level-0 px² equals the mask area: pixel edges are traced exactly.
    assert geom.area == pytest.approx(cmu_map.mask.sum() * cmu_map.px_level0**2, rel=1e-6)
    minx, miny, maxx, maxy = geom.bounds
    assert minx >= 0 and miny >= 0 and maxx <= 2220 + cmu_map.px_level0 and maxy <= 2967 + cmu_map.px_level0


def test_same_slide_same_names(sample_svs: Path, cmu_map: TissueMap) -> None:
    with open_slide(sample_svs) as slide:
        again = detect_tissue(slide)
    assert [(r.name, r.bbox_level0) for r in again.regions] == [(r.name, r.bbox_level0) for r in cmu_map.regions]


def test_blank_white_is_no_tissue() -> None:
    assert not tissue_mask(np.full((200, 200, 3), 255, np.uint8), 8.0).any()
    # Grey, noisy glass (a dim scan) is still not tissue: there is no split to force.
    rng = np.random.default_rng(1)
    glass = (228 + rng.integers(0, 10, (200, 200, 3))).astype(np.uint8)
    assert tissue_mask(glass, 8.0).mean() == 0.0


def test_fully_covered_crc_tile() -> None:
    rgb = tifffile.imread(CRC_TILE)
    assert tissue_mask(rgb, 0.5).mean() > 0.9
    # Through the slide reader at the default 8 µm/px (the TIFF says 72 dpi, i.e. unknown: give mpp).
    with open_slide(CRC_TILE, mpp=0.5) as slide:
        assert detect_tissue(slide).tissue_fraction > 0.9


def test_mpp_unknown_is_explicit() -> None:
    with open_slide(CRC_TILE) as slide, pytest.raises(MppUnknownError):
        detect_tissue(slide)


def test_core_with_little_tissue() -> None:
    """The damaged sample core: tissue in a circular segment only, 15.8% of the image by construction."""
    truth = TRUE_TISSUE_FRACTION["slide002_core002"]
    assert truth < 0.3
    with open_slide(CORES / "slide002_core002.jpg", mpp=0.499) as slide:
        found = detect_tissue(slide).tissue_fraction
    assert abs(found - truth) < 0.02


def test_small_cover_five_percent() -> None:
    """5% tissue on white: Otsu-with-majority-inversion would flip this; we must not."""
    img = np.full((400, 400, 3), 250, np.uint8)
    img[100:190, 100:190] = _stroma((90, 90))  # 8100 px of 160000 = 5.06%
    mask = tissue_mask(img, 4.0)
    assert mask.mean() == pytest.approx(8100 / 160000, abs=0.002)


def test_debris_removed_and_holes_filled() -> None:
    img = np.full((300, 300, 3), 250, np.uint8)
    img[50:250, 50:250] = _stroma((200, 200))
    img[140:150, 140:150] = 250  # 10x10 px hole = 6,400 µm² at 8 µm/px
    img[10:14, 10:14] = _stroma((4, 4))  # 16 px debris = 1,024 µm²
    mask = tissue_mask(img, 8.0, min_area_um2=5000, max_hole_um2=10_000)
    assert not mask[10:14, 10:14].any()
    assert mask[140:150, 140:150].all()
    assert mask.sum() == 200 * 200
    # A smaller debris threshold keeps the speck.
    assert tissue_mask(img, 8.0, min_area_um2=500)[10:14, 10:14].all()


def test_lumina_kept_when_asked() -> None:
    img = np.full((300, 300, 3), 250, np.uint8)
    img[50:250, 50:250] = _stroma((200, 200))
    img[100:140, 100:140] = 250  # lumen 40x40 px = 102,400 µm² at 8 µm/px
    img[200:203, 200:203] = 250  # 9 px gap = 576 µm²: always filled
    filled = tissue_mask(img, 8.0)
    kept = tissue_mask(img, 8.0, keep_lumina=True)
    assert filled[100:140, 100:140].all()
    assert not kept[100:140, 100:140].any()
    assert kept[200:203, 200:203].all()
    assert kept.sum() == 200 * 200 - 40 * 40


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((10, 10), np.uint8), 8.0)
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((10, 10, 3), np.uint8), 0.0)
