"""What the network sees outside the tissue (glass fill) and segment borders refined on the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli
from equiseg_wsi.context import fill_outside_tissue, tissue_pixels
from equiseg_wsi.refine import MAX_FINE_UM, colour_refine, fine_factor
from equiseg_wsi.tissue import TissueMap

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "sample_data" / "cores" / "slide001_core001.jpg"


def _tissue_on_glass(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rgb = np.full((96, 128, 3), 245, dtype=np.uint8)
    yy, xx = np.mgrid[:96, :128]
    tissue = (yy - 40) ** 2 + (xx - 70) ** 2 < 30**2
    rgb[tissue] = rng.integers(60, 200, size=(int(tissue.sum()), 3))
    return rgb, tissue


def test_fill_keeps_tissue_and_fills_everything_else_with_tissue_colours() -> None:
    rgb, tissue = _tissue_on_glass()
    out = fill_outside_tissue(rgb, tissue)
    assert np.array_equal(out[tissue], rgb[tissue])
    lo, hi = rgb[tissue].min(axis=0), rgb[tissue].max(axis=0)
    assert (out[~tissue] >= lo).all() and (out[~tissue] <= hi).all()
    assert abs(float(out[~tissue].mean()) - float(rgb[tissue].mean())) < 15  # no glass white left


def test_fill_commutes_with_quarter_turns_and_flips_exactly() -> None:
    rgb, tissue = _tissue_on_glass(1)
    out = fill_outside_tissue(rgb, tissue)
    for k in (1, 2, 3):
        turned = fill_outside_tissue(np.rot90(rgb, k).copy(), np.rot90(tissue, k).copy())
        assert np.array_equal(turned, np.rot90(out, k))
    flipped = fill_outside_tissue(rgb[:, ::-1].copy(), tissue[:, ::-1].copy())
    assert np.array_equal(flipped, out[:, ::-1])


def test_fill_leaves_all_tissue_and_no_tissue_alone() -> None:
    rgb, _ = _tissue_on_glass()
    assert fill_outside_tissue(rgb, np.ones(rgb.shape[:2], bool)) is rgb
    assert fill_outside_tissue(rgb, np.zeros(rgb.shape[:2], bool)) is rgb
    with pytest.raises(ValueError):
        fill_outside_tissue(rgb, np.ones((3, 3), bool))


def test_tissue_pixels_sample_the_mask_at_pixel_centres() -> None:
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True
    tissue = TissueMap(mask=mask, mpp=8.0, px_level0=16.0, tissue_fraction=mask.mean())
    # pixels of 4 level-0 px from (24, 8): centres at 26, 30, ... ; mask cell (1, 2) covers [32, 48) x [16, 32)
    got = tissue_pixels(tissue, 24.0, 8.0, 4.0, (8, 8))
    want = np.zeros((8, 8), bool)
    want[2:6, 2:6] = True
    assert np.array_equal(got, want)
    assert not tissue_pixels(tissue, -400.0, -400.0, 4.0, (4, 4)).any()  # outside the image: never tissue


def test_fine_factor_reaches_two_micrometres_and_respects_the_pixel_budget() -> None:
    assert fine_factor(8, 2.5, 100) == 16 and 2.5 * 8 / 16 <= MAX_FINE_UM
    assert fine_factor(8, 1.0, 100) == 8
    assert fine_factor(8, 1.0, 10**9) == 1


def _edge_case(edge: int = 37, factor: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two tissue classes split by a vertical image edge at fine column `edge`; cells know it only to 8 px."""
    h, w = 8, 10
    guide = np.full((h * factor, w * factor, 3), 200.0)
    guide[:, edge:] = 90.0
    labels = np.ones((h, w), dtype=np.int32)
    labels[:, edge // factor + 1 :] = 2  # the cell grid puts the border at 40, three pixels off
    tissue = np.ones(guide.shape[:2], bool)
    return labels, guide, tissue


def test_colour_refinement_moves_the_border_onto_the_image_edge() -> None:
    labels, guide, tissue = _edge_case()
    fine = colour_refine(labels, guide, 8, tissue, 2)
    first_two = np.argmax(fine == 2, axis=1)
    assert np.all(first_two == 37)
    unrefined = np.repeat(np.repeat(labels, 8, 0), 8, 1)
    assert np.all(np.argmax(unrefined == 2, axis=1) == 40)


def test_colour_refinement_commutes_with_rotation_and_keeps_background() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(6, 6)).astype(np.int32)
    guide = rng.random((48, 48, 3)) * 255
    tissue = np.ones((48, 48), bool)
    tissue[:5] = False
    fine = colour_refine(labels, guide, 8, tissue, 3)
    assert not fine[~tissue].any() and fine.max() <= 3
    for k in (1, 2, 3):
        turned = colour_refine(np.rot90(labels, k).copy(), np.rot90(guide, k).copy(), 8, np.rot90(tissue, k).copy(), 3)
        assert np.array_equal(turned, np.rot90(fine, k))


def test_refined_run_exports_areas_equal_to_its_polygons(tmp_path: Path) -> None:
    """`--refine colour` on a real core: finer label map, valid gap-free polygons whose areas are the CSV's."""
    from shapely.geometry import shape

    from equiseg_wsi.export.qupath_check import qupath_problems

    out = tmp_path / "out"
    common = ["run", str(CORE), "--mpp", "0.499", "--device", "cpu", "--target-mpp", "4", "--tile-size", "128",
              "--glass", "fill", "-q"]
    result = CliRunner().invoke(cli, [*common, "-o", str(out), "--refine", "colour"])
    assert result.exit_code == 0, result.output
    folder = out / "slide001_core001"
    labels = np.asarray(Image.open(folder / "core001_labels.png"))
    row = next(iter(__import__("csv").DictReader(open(folder / "biomarkers.csv", encoding="utf-8"))))
    assert float(row["cell_size_um"]) == pytest.approx(2.0)  # 4 µm/px x 8 px per cell / 16 fine px per cell
    collection = json.loads((folder / "slide001_core001.geojson").read_text())
    assert qupath_problems(collection) == []
    mpp = 0.499
    for feature in collection["features"]:
        cls = (feature["properties"].get("classification") or {}).get("name", "")
        if cls.startswith("Cluster "):
            i = int(cls.split()[1])
            area_um2 = shape(feature["geometry"]).area * mpp * mpp
            assert area_um2 == pytest.approx(float(row[f"c{i}_area_um2"]), rel=1e-3)
            assert (labels == i).sum() * 4.0 == pytest.approx(float(row[f"c{i}_area_um2"]), rel=1e-6)


def test_small_region_and_vanished_clusters_are_reported(tmp_path: Path) -> None:
    """A 15 x 15-cell core warns about its cell count; clusters merged away are named on stderr and in the
    manifest (never silent)."""
    rng = np.random.default_rng(0)
    rgb = np.empty((240, 240, 3), np.uint8)
    rgb[:, :120] = (150, 60, 140)
    rgb[:, 120:] = (225, 130, 170)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "core.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "core.png"), "-o", str(out), "--mpp", "1.0",
                                      "--target-mpp", "2.0", "--tile-size", "128", "--device", "cpu",
                                      "--weights", "random", "--n-clusters", "4", "--min-area", "1000000"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Warning: ")]
    assert any("only 225 tissue cells" in ln for ln in lines), lines
    assert any("cover(s) no tissue" in ln for ln in lines), lines
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slides"][0]["warnings"] and all(w in " ".join(lines) for w in manifest["slides"][0]["warnings"])


def test_layer3_on_a_region_of_an_odd_number_of_cells(tmp_path: Path) -> None:
    """A region of 29 x 29 layer3 cells is read as one tile rounded up to the coarsest stride (it failed with
    "tile sides must be multiples of 8" when the tile was sized by the finest stride)."""
    rng = np.random.default_rng(1)
    rgb = np.clip(np.array([170, 80, 150]) + rng.normal(0, 25, (232, 232, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "core.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "core.png"), "-o", str(out), "--mpp", "1.0",
                                      "--target-mpp", "2.0", "--layer", "layer3", "--device", "cpu",
                                      "--weights", "random", "--refine", "none", "-q"])
    assert result.exit_code == 0, result.output
    labels = np.asarray(Image.open(out / "core" / "core_labels.png"))
    assert labels.shape == (29, 29)


def test_label_png_records_where_it_lies_on_the_slide(tmp_path: Path) -> None:
    """The label PNG's tEXt chunks place it on the slide without the GeoJSON: its pixel size agrees with the
    CSV's cell size and its extent with the region outline in the GeoJSON."""
    from shapely.geometry import shape

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(CORE), "-o", str(out), "--mpp", "0.499", "--device", "cpu",
                                      "--target-mpp", "8", "--tile-size", "128", "-q"])
    assert result.exit_code == 0, result.output
    folder = out / "slide001_core001"
    png = Image.open(folder / "core001_labels.png")
    text = {k: float(v) for k, v in png.text.items()}
    row = next(iter(__import__("csv").DictReader(open(folder / "biomarkers.csv", encoding="utf-8"))))
    assert text["equiseg:cell_um"] == pytest.approx(float(row["cell_size_um"]))
    labels = np.asarray(png)
    rows, cols = np.nonzero(labels)
    cell, x0, y0 = text["equiseg:cell_level0"], text["equiseg:x0_level0"], text["equiseg:y0_level0"]
    outline = next(f for f in json.loads((folder / "slide001_core001.geojson").read_text())["features"]
                   if f["properties"]["name"] == "core001")
    minx, miny, maxx, maxy = shape(outline["geometry"]).bounds
    assert (minx, miny) == pytest.approx((x0 + cols.min() * cell, y0 + rows.min() * cell), abs=0.01)
    assert (maxx, maxy) == pytest.approx((x0 + (cols.max() + 1) * cell, y0 + (rows.max() + 1) * cell), abs=0.01)
