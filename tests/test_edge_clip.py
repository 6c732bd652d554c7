"""Segments and areas end at the image edge (issue 16, defect 8): a region's cell grid ends on a whole cell, so its
last row and column of cells stick out of the image; they are exported clipped, and counted by their part inside."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from conftest import SAMPLE_SVS
from shapely.geometry import shape

from equiseg_cli.main import cli
from equiseg_wsi.biomarkers import compute_biomarkers, segment_measurements
from equiseg_wsi.errors import InputError
from equiseg_wsi.export.geojson import qupath_problems
from equiseg_wsi.polygons import GridPlacement, cell_coverage, label_map_to_polygons
from equiseg_wsi.slide import open_slide

SIDE = 1002  # px at 0.5 µm/px: 16-px cells (8 µm at 1 µm/px) leave a 10-px partial column and row


def test_cell_coverage_is_the_share_inside_the_box() -> None:
    cov = cell_coverage((3, 4), GridPlacement(10.0, 20.0, 4.0), (10.0, 20.0, 23.0, 30.0))
    assert cov[:, :3] == pytest.approx(np.outer([1, 1, 0.5], [1, 1, 1]))
    assert cov[:, 3] == pytest.approx([0.25, 0.25, 0.125])
    assert np.all(cell_coverage((2, 2), GridPlacement(0, 0, 1), None) == 1.0)


def test_clipped_polygons_have_the_weighted_areas() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (12, 9)).astype(np.int32)
    placement = GridPlacement(5.0, 7.0, 8.0)
    clip = (5.0, 7.0, 5.0 + 8 * 8.5, 7.0 + 8 * 11.25)
    polys = label_map_to_polygons(labels, placement, 0, snap=False, clip=clip)
    cov = cell_coverage(labels.shape, placement, clip)
    measured = segment_measurements(labels, 3, 2.0, cov)
    for k in (1, 2, 3):
        assert polys[k].is_valid
        assert polys[k].bounds[2] <= clip[2] and polys[k].bounds[3] <= clip[3]
        assert polys[k].area == pytest.approx(cov[labels == k].sum() * 64.0, rel=1e-12)
        assert measured[k]["area_um2"] == pytest.approx(cov[labels == k].sum() * 4.0, rel=1e-12)
    row = compute_biomarkers(labels, np.full((12, 9, 3), 128, np.uint8), 3, 2.0, {}, cov)
    assert row["tissue_area_um2"] == pytest.approx(cov[labels > 0].sum() * 4.0)
    assert sum(row[f"c{k}_fraction"] for k in (1, 2, 3)) == pytest.approx(1.0)
    with pytest.raises(InputError, match="coverage"):
        compute_biomarkers(labels, np.full((12, 9, 3), 128, np.uint8), 3, 2.0, {}, cov[:, :4])


@pytest.fixture(scope="module")
def dense_crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1002 x 1002 px crop of the real CC0 region where tissue reaches every edge of the image."""
    folder = tmp_path_factory.mktemp("crop")
    with open_slide(SAMPLE_SVS) as slide:
        rgb = slide.read_level(0, 700, 1900, SIDE, SIDE)
    from PIL import Image

    Image.fromarray(rgb).save(folder / "crop.png")
    return folder


@pytest.mark.parametrize("refine", ["none", "colour"])
def test_segments_and_areas_end_at_the_image_edge(dense_crop: Path, tmp_path: Path, refine: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(dense_crop), "-o", str(out), "--mpp", "0.5", "--refine", refine,
                                      "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    geojson = json.loads((out / "crop" / "crop.geojson").read_text())
    assert qupath_problems(geojson) == []
    features = geojson["features"]
    named = {f["properties"]["classification"]["name"]: shape(f["geometry"])
             for f in features if "classification" in f["properties"]}
    clusters = list(named.values())
    bounds = np.array([g.bounds for g in clusters])
    assert bounds[:, 2].max() == SIDE and bounds[:, 3].max() == SIDE  # reaches the edge, not past it
    assert bounds[:, :2].min() >= 0
    row = next(csv.DictReader(open(out / "crop" / "biomarkers.csv", encoding="utf-8")))
    um2 = 0.25  # µm² per level-0 px
    assert float(row["tissue_area_um2"]) <= SIDE * SIDE * um2
    total = sum(g.area for g in clusters) * um2
    assert float(row["tissue_area_um2"]) == pytest.approx(total, rel=1e-9)
    for k in (1, 2, 3):
        area = named[f"Cluster {k}"].area if f"Cluster {k}" in named else 0.0
        assert float(row[f"c{k}_area_um2"]) == pytest.approx(area * um2, rel=1e-9)
    outline = shape(features[0]["geometry"])
    assert shapely.union_all(clusters).symmetric_difference(outline).area < 1e-6 * outline.area
