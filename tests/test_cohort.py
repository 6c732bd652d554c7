"""Cohort clustering (issue 5): `fit`, `run --kmeans-model`, and the original `intra` / `inter` commands."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.models.arch import DEFAULT_ARCH

REPO = Path(__file__).resolve().parents[1]
CORES = REPO / "sample_data" / "cores"
# Coarse resolution and a small halo keep these tests fast; the code path is the one of the defaults.
FAST = ["--target-mpp", "8", "--halo", "32", "--device", "cpu", "--quiet"]


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def shared_tissue(tmp_path_factory: pytest.TempPathFactory, sample_rgb: np.ndarray) -> Path:
    """Two core images holding the same tissue R at the same place: X = [R | white], Y = [R | other tissue]."""
    folder = tmp_path_factory.mktemp("shared")
    r = sample_rgb[1300:2200, 950:1750]
    other = sample_rgb[1300:2200, 150:950][:, ::-1]
    x = np.full((900, 1600, 3), 255, dtype=np.uint8)
    x[:, :800] = r
    y = x.copy()
    y[:, 800:] = other
    Image.fromarray(x).save(folder / "slide101_core001.png")
    Image.fromarray(y).save(folder / "slide102_core001.png")
    (folder / "manifest.csv").write_text(
        "path,slide,core,mpp\nslide101_core001.png,slide101,core001,0.499\nslide102_core001.png,slide102,core001,0.499\n"
    )
    return folder


@pytest.fixture(scope="module")
def cohort_model(shared_tissue: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "cohort.npz"
    _invoke(["fit", str(shared_tissue), "-o", str(path), "--target-mpp", "4", "--halo", "32", "--device", "cpu",
             "--quiet"])
    return path


def test_cohort_model_gives_the_same_ids_for_the_same_tissue(shared_tissue: Path, cohort_model: Path,
                                                             tmp_path: Path) -> None:
    model = ClusterModel.load(cohort_model)
    assert model.sources == ["slide101_core001/core001", "slide102_core001/core001"]
    assert model.feature_identity["target_mpp"] == 4.0 and model.feature_identity["layer"] == "layer4"
    out = tmp_path / "run"
    _invoke(["run", str(shared_tissue), "-o", str(out), "--kmeans-model", str(cohort_model),
             "--target-mpp", "4", "--halo", "32", "--device", "cpu", "--quiet"])
    x = np.asarray(Image.open(out / "slide101_core001" / "core001_labels.png"))
    y = np.asarray(Image.open(out / "slide102_core001" / "core001_labels.png"))
    cols = 800 * 0.499 / 32  # R spans this many 32 µm cells; compare its left half, away from the other tissue
    left = (slice(0, x.shape[0]), slice(0, int(cols / 2)))
    both = (x[left] > 0) & (y[left] > 0)
    assert both.sum() > 40
    agreement = (x[left][both] == y[left][both]).mean()
    assert agreement > 0.95, agreement
    rows = list(csv.DictReader(open(out / "biomarkers.csv")))
    assert {r["n_clusters"] for r in rows} == {str(model.k)}


def test_model_file_round_trips_and_reads_without_the_package(cohort_model: Path, tmp_path: Path) -> None:
    model = ClusterModel.load(cohort_model)
    copy = model.save(tmp_path / "copy.npz")
    assert copy.read_bytes() == cohort_model.read_bytes()
    with np.load(cohort_model, allow_pickle=False) as z:  # the few lines docs/cohort.md shows
        centroids = z["centroids"]
        meta = json.loads(str(z["metadata"]))
    assert centroids.shape == (meta["k"], DEFAULT_ARCH.widths[-1]) and meta["normalisation"] == "l2"
    assert np.array_equal(centroids, model.centroids)


@pytest.mark.parametrize("option", [["--target-mpp", "8"], ["--layer", "layer3"]])
def test_mismatched_model_is_refused(shared_tissue: Path, cohort_model: Path, tmp_path: Path,
                                     option: list[str]) -> None:
    args = ["run", str(shared_tissue / "slide101_core001.png"), "--mpp", "0.499", "-o", str(tmp_path / "o"),
            "--kmeans-model", str(cohort_model), "--target-mpp", "4", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(cli, [*args, *option])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: clustering model does not fit these features")
    assert ("target_mpp" if option[0] == "--target-mpp" else "layer") in lines[0]


def test_every_training_core_influences_the_model(tmp_path: Path) -> None:
    """Fitting with and without one distinctive core (a blue-shifted copy) gives different centroids."""
    from equiseg_wsi.cohort import fit_cohort
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.options import ExtractorSpec, RegionOptions, RunJob, RunOptions, SegmentOptions

    rgb = np.asarray(Image.open(CORES / "slide001_core002.jpg").convert("RGB")).astype(np.int16)
    odd = np.clip(rgb[..., ::-1] + np.array([-40, 0, 40]), 0, 255).astype(np.uint8)
    Image.fromarray(odd).save(tmp_path / "slide009_core001.png")
    common = [CORES / "slide001_core001.jpg", CORES / "slide002_core001.jpg"]
    job = RunJob(ExtractorSpec(device="cpu", target_mpp=8.0),
                 RunOptions(SegmentOptions(target_mpp=8.0, halo=32), RegionOptions(mpp=0.499)))
    without, _ = fit_cohort(collect_inputs(common, mpp=0.499), job)
    with_odd, failures = fit_cohort(collect_inputs([*common, tmp_path / "slide009_core001.png"], mpp=0.499), job)
    assert not failures
    assert with_odd.sources[-1] == "slide009_core001/core001"
    assert with_odd.n_fit_samples > without.n_fit_samples
    assert not np.allclose(with_odd.centroids, without.centroids, atol=1e-3)


def test_inter_with_the_original_spellings(tmp_path: Path) -> None:
    """Default split by slide id: slide001's two cores train, slide002's core is the test set."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("slide001_core001.jpg", "slide001_core002.jpg", "slide002_core001.jpg"):
        shutil.copy(CORES / name, data)
    (data / "cores.csv").write_text(
        "processed,slide,core,mpp\nslide001_core001.jpg,slide001,core001,0.499\n"
        "slide001_core002.jpg,slide001,core002,0.499\nslide002_core001.jpg,slide002,core001,0.499\n"
    )
    out = tmp_path / "inter"
    _invoke(["inter", "--csv_path", str(data / "cores.csv"), "--output_path", str(out), "--n_clusters", "3",
             "--n_samples", "500", "--seed", "7", "--angles", "0,90", *FAST])
    model = ClusterModel.load(out / "kmeans_model.npz")
    assert model.sources == ["slide001_core001/core001", "slide001_core002/core002"]  # every training core
    assert model.seed == 7 and model.k == 3
    assert (out / "slide002_core001" / "slide002_core001.geojson").is_file()
    assert not (out / "slide001_core001").exists()  # training cores are not in the test outputs
    assert (out / "rotation" / "slide002_core001.png").is_file()
    rows = list(csv.DictReader(open(out / "rotation.csv")))
    assert [float(r["angle_deg"]) for r in rows] == [0.0, 90.0]
    assert float(rows[1]["pixel_agreement"]) >= 0.999  # SRE, same model at every angle


def test_intra_with_the_original_spellings(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(CORES / "slide002_core002.jpg", data)
    (data / "cores.csv").write_text("path,slide,core,mpp\nslide002_core002.jpg,slide002,core002,0.499\n")
    out = tmp_path / "intra"
    _invoke(["intra", "--csv-path", str(data / "cores.csv"), "--output-path", str(out), "--n_clusters", "3",
             "--angles", "0,90", *FAST])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["done"] == 1 and manifest["model"]["analysis"] == "intra"
    strip = Image.open(out / "rotation" / "slide002_core002.png")
    assert strip.width > strip.height  # two panels side by side
    rows = list(csv.DictReader(open(out / "rotation.csv")))
    assert len(rows) == 2 and rows[0]["core"] == "core002"


def test_inter_refuses_a_split_with_one_slide(tmp_path: Path) -> None:
    (tmp_path / "one.csv").write_text(f"path,slide,core,mpp\n{CORES / 'slide001_core001.jpg'},slide001,core001,0.499\n")
    result = CliRunner().invoke(cli, ["inter", "--csv_path", str(tmp_path / "one.csv"), "--output_path",
                                      str(tmp_path / "o"), *FAST])
    assert result.exit_code != 0
    assert "--test_data_path" in result.output and "Traceback" not in result.output
