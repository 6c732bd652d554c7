"""`equiseg run` end to end on the real CC0 slide, a core image and a synthetic slide with known shapes."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from PIL import Image
from shapely.geometry import shape

from equiseg_cli.main import cli
from equiseg_wsi.export.geojson import qupath_problems, read_geojson
from equiseg_wsi.testing.slide_writer import write_aperio_pyramid

REPO = Path(__file__).resolve().parents[1]
# Coarser than the default (2.5 µm/px) to keep the suite fast; the code path is the same.
FAST = ["--target-mpp", "4", "--tile-size", "256", "--device", "cpu", "--quiet"]


def _run(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["run", *args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(REPO / "sample_data" / "CMU-1-Small-Region.svs", folder)
    cores = folder / "cores"
    cores.mkdir()
    shutil.copy(REPO / "sample_data" / "cores" / "slide001_core001.jpg", cores)
    (cores / "manifest.csv").write_text("path,slide,core,mpp\nslide001_core001.jpg,slide001,core001,0.499\n")
    return folder


@pytest.fixture(scope="module")
def run_twice(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    outs = []
    for name in ("first", "second"):
        out = tmp_path_factory.mktemp(name)
        _run([str(inputs), "-o", str(out), *FAST])
        outs.append(out)
    return outs[0], outs[1]


def test_outputs_exist(run_twice: tuple[Path, Path]) -> None:
    out = run_twice[0]
    slide = out / "CMU-1-Small-Region"
    for name in ("CMU-1-Small-Region.geojson", "biomarkers.csv", "region-001_overlay.png",
                 "region-001_labels.png", "slide.json"):
        assert (slide / name).is_file(), name
    assert (out / "slide001_core001" / "core001_overlay.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"] == {"slides": 2, "done": 2, "failed": 0, "regions": 2}
    # the packaged trained model is the default (docs/model_card.md); its identity is its file's sha256
    from equiseg_wsi.models.weights import default_weights

    digest = hashlib.sha256(default_weights("sre").read_bytes()).hexdigest()
    assert manifest["model"]["extractor"]["source"] == f"sha256:{digest}"
    rows = list(csv.DictReader(open(out / "biomarkers.csv")))
    assert [(r["slide"], r["region"]) for r in rows] == [("CMU-1-Small-Region", "region-001"), ("slide001", "core001")]
    for row in rows:
        fractions = [float(row[f"c{i}_fraction"]) for i in (1, 2, 3)]
        assert sum(fractions) == pytest.approx(1.0)
    overlay = Image.open(slide / "region-001_overlay.png")
    assert overlay.mode == "RGB" and overlay.width > 100


def test_geojson_follows_qupath_rules(run_twice: tuple[Path, Path]) -> None:
    for path in sorted(run_twice[0].glob("*/*.geojson")):
        collection = json.loads(path.read_text())
        assert qupath_problems(collection) == [], path
        assert collection["type"] == "FeatureCollection"
        for feature in collection["features"]:
            assert "type" not in feature["properties"]
            assert feature["properties"]["objectType"] == "annotation"


def test_two_runs_are_byte_identical(run_twice: tuple[Path, Path]) -> None:
    first, second = run_twice
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.suffix in (".geojson", ".csv", ".png"))
    assert len(names) >= 8
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_polygons_tile_the_tissue_of_each_region(run_twice: tuple[Path, Path]) -> None:
    """Clusters do not overlap, together cover the region's tissue, and match the label-map areas."""
    out = run_twice[0] / "CMU-1-Small-Region"
    features = read_geojson(out / "CMU-1-Small-Region.geojson")["features"]
    outline = next(shape(f["geometry"]) for f in features if "classification" not in f["properties"])
    clusters = {f["properties"]["classification"]["name"]: shape(f["geometry"])
                for f in features if "classification" in f["properties"]}
    assert sorted(clusters) == ["Cluster 1", "Cluster 2", "Cluster 3"]
    parts = list(clusters.values())
    overlap = sum(parts[i].intersection(parts[j]).area for i in range(3) for j in range(i + 1, 3))
    assert overlap < 0.001 * outline.area
    union = shapely.union_all(parts)
    assert union.symmetric_difference(outline).area < 0.01 * outline.area
    # areas against the label map (PNG values are the cluster ids) and the biomarker table
    labels = np.asarray(Image.open(out / "region-001_labels.png"))
    row = next(csv.DictReader(open(out / "biomarkers.csv")))
    cell_level0 = float(row["cell_size_um"]) / 0.499
    for i in (1, 2, 3):
        pixels = int((labels == i).sum())
        polygon_cells = clusters[f"Cluster {i}"].area / cell_level0**2
        assert polygon_cells == pytest.approx(pixels, rel=0.01)
        assert float(row[f"c{i}_area_um2"]) == pytest.approx(pixels * float(row["cell_size_um"]) ** 2)


def test_resume_skips_finished_slides(inputs: Path, run_twice: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(run_twice[0], out)
    geojson = out / "CMU-1-Small-Region" / "CMU-1-Small-Region.geojson"
    stamp = geojson.stat().st_mtime_ns
    result = CliRunner().invoke(cli, ["run", str(inputs), "-o", str(out), *FAST[:-1]])
    assert result.exit_code == 0, result.output
    assert "0 slide(s) done, 2 skipped" in result.output
    assert geojson.stat().st_mtime_ns == stamp


def _synthetic_slide(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """Pink stroma-like tissue with a dark purple and a pale blue block at known level-0 rectangles."""
    rng = np.random.default_rng(0)
    h, w = 1600, 1600
    noise = rng.normal(0, 6, (h, w, 1))
    img = np.clip(np.array([225, 150, 190]) + noise, 0, 255)
    blocks = {"dark": (200, 240, 560, 480), "pale": (880, 880, 520, 560)}  # x, y, width, height
    colors = {"dark": (80, 40, 120), "pale": (150, 190, 235)}
    for name, (x, y, bw, bh) in blocks.items():
        img[y : y + bh, x : x + bw] = np.clip(np.array(colors[name]) + noise[y : y + bh, x : x + bw], 0, 255)
    write_aperio_pyramid(path, img.astype(np.uint8), mpp=0.5, n_levels=3)
    return blocks


def _block_errors(out: Path, blocks: dict[str, tuple[int, int, int, int]], cell: float) -> dict[str, float]:
    """Hausdorff distance (level-0 px) between each block and the cluster covering most of it, near the block."""
    features = read_geojson(out / "shapes" / "shapes.geojson")["features"]
    clusters = [shape(f["geometry"]) for f in features if "classification" in f["properties"]]
    errors = {}
    for name, (x, y, bw, bh) in blocks.items():
        truth = shapely.box(x, y, x + bw, y + bh)
        best = max(clusters, key=lambda g: g.intersection(truth).area)
        errors[name] = best.intersection(truth.buffer(3 * cell)).hausdorff_distance(truth)
    return errors


def test_synthetic_shapes_are_found_where_they_are(tmp_path: Path) -> None:
    """Read through the 4x pyramid level (2 µm/px of a 0.5 µm/px slide); segments within one feature cell."""
    blocks = _synthetic_slide(tmp_path / "shapes.svs")
    out = tmp_path / "out"
    # geometry of the pipeline (pyramid level, coordinates) on the feature-cell grid, with the seeded random
    # model whose boundaries on these flat synthetic blocks are sharp
    _run([str(tmp_path / "shapes.svs"), "-o", str(out), "--target-mpp", "2", "--tile-size", "256",
          "--min-area", "0", "--device", "cpu", "--quiet", "--weights", "random", "--refine", "none"])
    cell = 2.0 * 8 / 0.5  # level-0 px per feature cell
    for name, error in _block_errors(out, blocks, cell).items():
        assert error <= cell + 1e-6, name


@pytest.mark.parametrize("weights", [[], ["--weights", "random"]])
def test_refined_borders_land_on_the_block_edges(tmp_path: Path, weights: list[str]) -> None:
    """At the defaults (refinement, then the small-segment merge) every border lies within one fine pixel (2 µm =
    4 level-0 px here) of the true edge, where the cell grid is up to one cell (32 px) off. The merge is part of
    it: with --min-area 0 single stray pixels about one cell outside a block stay (README, --refine)."""
    blocks = _synthetic_slide(tmp_path / "shapes.svs")
    out = tmp_path / "out"
    _run([str(tmp_path / "shapes.svs"), "-o", str(out), "--target-mpp", "2", "--tile-size", "256",
          "--device", "cpu", "--quiet", *weights])
    for name, error in _block_errors(out, blocks, 32.0).items():
        assert error <= 4.0 + 1e-6, name


def test_tma_slide_is_processed_per_core(tmp_path: Path) -> None:
    """The sample TMA is detected, dearrayed, and each present core becomes a region named like QuPath."""
    ids = tmp_path / "ids.csv"
    ids.write_text("core,case_id\nA-1,patient-7\n")
    out = tmp_path / "out"
    _run([str(REPO / "sample_data" / "tma" / "tma_3x4.svs"), "-o", str(out), "--case-ids", str(ids),
          "--target-mpp", "5", "--tile-size", "128", "--device", "cpu", "--quiet"])
    truth = list(csv.DictReader(open(REPO / "sample_data" / "tma" / "tma_3x4_truth.csv")))
    present = sorted(r["name"] for r in truth if r["present"].lower() == "true")
    rows = list(csv.DictReader(open(out / "biomarkers.csv")))
    assert [r["region"] for r in rows] == [r["name"] for r in truth]  # every grid position, row-major
    assert sorted(r["region"] for r in rows if r["present"] == "True") == present
    a1 = next(r for r in rows if r["region"] == "A-1")
    assert (a1["grid_row"], a1["grid_column"], a1["case_id"]) == ("1", "1", "patient-7")
    for r in rows:  # missing cores: a row saying so, with its grid position and no measurements
        if r["present"] == "False":
            assert r["region"] in {"A-2", "B-1"} and r["grid_row"] and r["grid_column"] and r["slide"] == "tma_3x4"
            assert r["tissue_area_um2"] == "" and r["c1_fraction"] == "" and r["n_clusters"] != ""
    assert json.loads((out / "manifest.json").read_text())["summary"]["regions"] == len(present)
    slide_rows = list(csv.DictReader(open(out / "tma_3x4" / "biomarkers.csv")))
    assert slide_rows == rows
    qptma = (out / "tma_3x4" / "tma_3x4.qptma").read_text().splitlines()
    assert qptma[0] == "TMA grid width: 4" and qptma[1] == "TMA grid height: 3"
    assert any(line.startswith("A-1\t") and line.endswith("\tpatient-7") for line in qptma)


def test_summary_counts_measured_regions_not_missing_cores(tmp_path: Path) -> None:
    """The final line and the per-slide log line count the 10 present cores, not the 2 missing cores' rows."""
    from click.testing import CliRunner

    from equiseg_cli.main import cli

    result = CliRunner().invoke(cli, ["run", str(REPO / "sample_data" / "tma" / "tma_3x4.svs"), "-o",
                                      str(tmp_path / "out"), "--target-mpp", "5", "--tile-size", "128",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "; 10 region(s);" in result.output and "done (10 region(s)" in result.output, result.output
