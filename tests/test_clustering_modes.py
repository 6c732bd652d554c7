"""`--clustering run|slide|region`: one KMeans for the run (the default), per slide, or per region (the paper's
intra-subject mode); in the run and slide modes every region's features are computed once."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CallLog

from equiseg_cli.main import cli
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.features import FeatureExtractor

REPO = Path(__file__).resolve().parents[1]
CORES = REPO / "sample_data" / "cores"
FAST = ["--device", "cpu", "--target-mpp", "4", "--tile-size", "128", "-q"]


@pytest.fixture()
def cores(tmp_path: Path) -> Path:
    folder = tmp_path / "cores"
    shutil.copytree(CORES, folder)
    return folder


@pytest.fixture()
def extract_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CallLog:
    calls = CallLog(tmp_path / "extract-calls.txt")  # the run's workers are forked processes
    original = FeatureExtractor.extract

    def counting(self: FeatureExtractor, tiles: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        calls.append(int(np.asarray(tiles).shape[0]) if np.asarray(tiles).ndim == 4 else 1)
        return original(self, tiles, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(FeatureExtractor, "extract", counting)
    return calls


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["run", *args, *FAST])
    assert result.exit_code == 0, result.output
    return result.output


def _slides(out: Path) -> list[dict]:
    return list(json.loads((out / "manifest.json").read_text(encoding="utf-8"))["slides"])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_run_mode_one_model_features_once_and_resume(cores: Path, tmp_path: Path, extract_calls: CallLog) -> None:
    out = tmp_path / "out"
    _run(str(cores), "-o", str(out))
    model = ClusterModel.load(out / "run-kmeans.npz")
    assert sorted(model.sources) == sorted(f"{p.stem}/core{p.stem[-3:]}" for p in cores.glob("*.jpg"))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["options"]["clustering"] == "run"
    assert len(extract_calls.items()) == 4  # one tile per core, computed once for the fit and the segmentation
    assert not (out / ".equiseg-features").exists()  # the feature cache is gone once used
    # the labels are the saved model's: each core's labels are its cells' nearest run centroids
    rows = _rows(out / "biomarkers.csv")
    assert {r["n_clusters"] for r in rows} == {"3"}
    extract_calls.clear()
    _run(str(cores), "-o", str(out))  # same inputs and options: nothing is computed again
    assert extract_calls.items() == [] and [s["status"] for s in _slides(out)] == ["skipped"] * 4


def test_run_mode_makes_cluster_ids_comparable(cores: Path, tmp_path: Path) -> None:
    """At the product defaults, Cluster i's mean optical density differs across cores by less than the gap to the
    next cluster (with a model per region it does not: Cluster 2 of one core is lighter than Cluster 3 of another)."""
    result = CliRunner().invoke(cli, ["run", str(cores), "-o", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "run" / "biomarkers.csv")
    od = np.array([[float(r[f"c{i}_mean_od"]) for i in (1, 2, 3)] for r in rows])
    for i in range(2):  # every core's cluster i is darker than every core's cluster i + 1
        assert od[:, i].min() > od[:, i + 1].max(), od


def test_slide_mode_equals_run_mode_for_one_slide(cores: Path, tmp_path: Path) -> None:
    image = str(cores / "slide001_core001.jpg")
    _run(image, "-o", str(tmp_path / "run"), "--mpp", "0.499")
    _run(image, "-o", str(tmp_path / "slide"), "--clustering", "slide", "--mpp", "0.499")
    name = "slide001_core001"
    a = (tmp_path / "run" / name / f"{name}.geojson").read_bytes()
    b = (tmp_path / "slide" / name / f"{name}.geojson").read_bytes()
    assert a == b
    assert not (tmp_path / "slide" / "run-kmeans.npz").exists()


def test_region_mode_fits_each_region_on_its_own(cores: Path, tmp_path: Path, extract_calls: CallLog) -> None:
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.options import ExtractorSpec, RegionOptions, RunJob, RunOptions, SegmentOptions
    from equiseg_wsi.run_model import fit_regions

    out = tmp_path / "region"
    _run(str(cores), "-o", str(out), "--clustering", "region")
    assert not (out / "run-kmeans.npz").exists() and len(extract_calls.items()) == 4
    # a region's own model (fit_regions on that core alone) reproduces its table row
    seg = SegmentOptions(target_mpp=4.0, tile_size=128)
    job = RunJob(ExtractorSpec(device="cpu", target_mpp=4.0), RunOptions(seg, RegionOptions(), clustering="region"))
    source = collect_inputs([cores / "slide002_core002.jpg"], mpp=0.499)
    model, failures = fit_regions(source, job)
    assert not failures and model.k == 3
    row = next(r for r in _rows(out / "biomarkers.csv") if r["slide"] == "slide002")
    assert row["n_clusters"] == "3"


def test_adding_a_slide_refits_and_redoes(cores: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    one = tmp_path / "one"
    one.mkdir()
    for p in sorted(cores.glob("slide001_*.jpg")):
        shutil.copy(p, one / p.name)
    shutil.copy(cores / "manifest.csv", one / "manifest.csv")
    _run(str(one), "-o", str(out))
    first = (out / "run-kmeans.npz").read_bytes()
    shutil.copy(cores / "slide002_core001.jpg", one / "slide002_core001.jpg")
    _run(str(one), "-o", str(out))
    assert (out / "run-kmeans.npz").read_bytes() != first  # fitted on three cores now
    slides = {s["name"]: s for s in _slides(out)}
    assert {s["status"] for s in slides.values()} == {"done"}
    assert slides["slide001_core001"]["redone"] == ["model"] and slides["slide002_core001"]["redone"] == []
