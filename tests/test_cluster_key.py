"""OUT/cluster_key.png (example patches of every cluster) and --cluster-names (QuPath class names)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.errors import InputError
from equiseg_wsi.export import cluster_key as ck
from equiseg_wsi.export.geojson import cluster_color, qupath_problems, read_geojson
from equiseg_wsi.options import RunOptions, SegmentOptions

REPO = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--target-mpp", "4", "--tile-size", "128", "-q"]
NAMES = ("Epithelium", "Stroma", "Lumen")


@pytest.fixture(scope="module")
def cores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cores")
    for name in ("slide001_core001.jpg", "slide002_core001.jpg"):
        shutil.copy(REPO / "sample_data" / "cores" / name, folder)
    (folder / "manifest.csv").write_text("path,slide,core,mpp\nslide001_core001.jpg,slide001,core001,0.499\n"
                                         "slide002_core001.jpg,slide002,core001,0.499\n")
    return folder


@pytest.fixture(scope="module")
def named_run(cores: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("named")
    result = CliRunner().invoke(cli, ["run", str(cores), "-o", str(out), *FAST, "--cluster-names", ",".join(NAMES)])
    assert result.exit_code == 0, result.output
    return out


def _row_swatch(image: Image.Image, i: int) -> tuple[int, ...]:
    row_h = ck.PATCH_PX + ck.CAPTION_H + ck.PAD
    return tuple(image.getpixel((ck.PAD + 11, ck.TITLE_H + i * row_h + 15)))  # type: ignore[arg-type]


def test_a_run_writes_a_key_with_every_cluster(named_run: Path) -> None:
    key = named_run / ck.CLUSTER_KEY_NAME
    image = Image.open(key).convert("RGB")
    k = len(NAMES)
    assert image.height == ck.TITLE_H + k * (ck.PATCH_PX + ck.CAPTION_H + ck.PAD) + ck.PAD
    assert [_row_swatch(image, i) for i in range(k)] == [cluster_color(i) for i in range(k)]
    manifest = json.loads((named_run / "manifest.json").read_text())
    assert manifest["options"]["cluster_names"] == list(NAMES)
    exemplars = [e for s in manifest["slides"] for e in s["exemplars"]]
    assert {e["cluster"] for e in exemplars} == set(range(1, k + 1))
    assert {(e["region"], e["mpp"]) for e in exemplars} == {("core001", 0.499)}
    report = (named_run / "report.html").read_text()
    assert ck.CLUSTER_KEY_NAME in report and all(n in report for n in NAMES)


def test_cluster_names_become_qupath_classes_with_the_same_colours(named_run: Path) -> None:
    for slide in ("slide001_core001", "slide002_core001"):
        collection = read_geojson(named_run / slide / f"{slide}.geojson")
        assert qupath_problems(collection) == []
        classes = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
                   for f in collection["features"] if "classification" in f["properties"]}
        assert classes and set(classes) <= set(NAMES)
        assert all(color == cluster_color(NAMES.index(name)) for name, color in classes.items())
    header = (named_run / "biomarkers.csv").read_text().splitlines()[0]
    assert "c1_fraction" in header and "Epithelium" not in header


@pytest.mark.parametrize("names, message", [
    ("A,B", "2 name(s) given for 3 clusters"),
    ("A,B:x,C", "must not contain ':'"),
    ("A,,C", "empty name"),
    ("A,A,C", "unique"),
])
def test_wrong_names_fail_in_one_line_before_any_work(cores: Path, tmp_path: Path, names: str, message: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(cores), "-o", str(out), *FAST, "--cluster-names", names])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--cluster-names" in lines[0] and message in lines[0], result.output
    assert not out.exists()


def test_run_options_check_the_names() -> None:
    assert RunOptions(segment=SegmentOptions(n_clusters=2), cluster_names=("a", "b")).cluster_names == ("a", "b")
    with pytest.raises(InputError, match="--cluster-names"):
        RunOptions(cluster_names=("a", "b\nc", "d"))


def _brute_force(features: np.ndarray, labels: np.ndarray, centroids: np.ndarray, n: int, gap: int
                 ) -> list[tuple[int, int, int]]:
    """(cluster, row, col) of the exemplars, one cell at a time in float64."""
    out = []
    for k in range(1, centroids.shape[0] + 1):
        cells = []
        for r, c in zip(*np.nonzero(labels == k), strict=True):
            x = features[r, c].astype(np.float64)
            x = x / max(np.linalg.norm(x), 1e-12)
            cells.append((float(((x - centroids[k - 1]) ** 2).sum()), int(r) * labels.shape[1] + int(c), int(r),
                          int(c)))
        taken: list[tuple[int, int]] = []
        for _d, _i, r, c in sorted(cells):
            if all(abs(r - tr) >= gap or abs(c - tc) >= gap for tr, tc in taken):
                taken.append((r, c))
                out.append((k, r, c))
            if len(taken) == n:
                break
    return out


@pytest.mark.parametrize("gap", [0, 3])
def test_exemplar_cells_are_the_nearest_to_each_centroid(gap: int) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, 24, 8)).astype(np.float32)
    centroids = rng.normal(size=(3, 8))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    model = ClusterModel(centroids=centroids.astype(np.float32), k=3)
    tissue = np.zeros((20, 24), dtype=bool)
    tissue[2:18, 3:21] = True
    labels = model.predict(features, mask=tissue)
    got = ck.exemplar_cells(features, labels, model, 100.0, 50.0, 16.0, n=3, min_gap=gap, chunk=37)
    cells = [(k, round((y - 50) / 16 - 0.5), round((x - 100) / 16 - 0.5)) for k, _d, x, y in got]
    assert cells == _brute_force(features, labels, model.centroids.astype(np.float64), 3, gap)
    assert all(tissue[r, c] and labels[r, c] == k for k, r, c in cells)
    assert [d for k, d, _x, _y in got if k == 1] == sorted(d for k, d, _x, _y in got if k == 1)


def test_a_real_region_records_its_nearest_tissue_cells() -> None:
    from equiseg_wsi.features import build_extractor
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.options import ExtractorSpec, RegionOptions
    from equiseg_wsi.regions import open_regions
    from equiseg_wsi.segment import region_features, segment_region

    options = SegmentOptions(target_mpp=4.0, tile_size=128)
    extractor = build_extractor(ExtractorSpec(device="cpu", target_mpp=4.0))
    source = collect_inputs([REPO / "sample_data" / "cores" / "slide001_core001.jpg"], mpp=0.499)[0]
    with open_regions(source, RegionOptions(mpp=0.499)) as (slide, found):
        area = found.areas[0]
        seg = segment_region(slide, area, extractor, options)
        with region_features(slide, area, extractor, options) as rf:
            labels = seg.model.predict(rf.features, mask=rf.tissue)
            gap = ck.exemplar_gap(options.target_mpp * extractor.stride)
            expected = _brute_force(np.asarray(rf.features), labels, seg.model.centroids.astype(np.float64), 3,
                                    gap)
            cell = rf.cell_level0
            cells = [(k, int((y - rf.y0) // cell), int((x - rf.x0) // cell)) for k, _d, x, y in seg.exemplars]
            assert cells == expected
            assert all(rf.tissue[r, c] for _k, r, c in cells)
            assert {k for k, _r, _c in cells} == set(range(1, seg.model.k + 1))


def test_patches_come_from_different_slides_first() -> None:
    picks = [ck._Pick(slide, "p", region, d2, 0.0, 0.0, 1.0) for slide, region, d2 in [
        ("a", "r1", 0.1), ("a", "r1", 0.2), ("a", "r2", 0.3), ("b", "r1", 0.5), ("a", "r1", 0.05)]]
    chosen = ck.choose_patches(picks, 3)
    assert [(p.slide, p.region, p.d2) for p in chosen] == [("a", "r1", 0.05), ("a", "r2", 0.3), ("b", "r1", 0.5)]
    assert len(ck.choose_patches(picks, 10)) == 5


def test_the_title_says_how_far_cluster_ids_compare() -> None:
    region = ck._title(RunOptions(clustering="region"), None, 1, 1)[0]
    assert "clusters are per region: Cluster i is only each region's i-th darkest" in region
    assert "same tissue type in every core" in ck._title(RunOptions(), "OUT/run-kmeans.npz", 1, 1)[0]
    assert "per slide" in ck._title(RunOptions(clustering="slide"), None, 1, 1)[0]


def test_the_mean_colour_is_area_weighted() -> None:
    rows = [{"c1_area_um2": 1.0, "c1_mean_r": 100, "c1_mean_g": 0, "c1_mean_b": 0, "c2_area_um2": 0.0},
            {"c1_area_um2": 3.0, "c1_mean_r": 200, "c1_mean_g": 40, "c1_mean_b": 0, "c2_area_um2": "nan"}]
    colours, shares = ck.mean_colours([{"status": "done", "regions": rows}], 2)
    assert colours == [(175, 30, 0), None] and shares == [1.0, 0.0]
