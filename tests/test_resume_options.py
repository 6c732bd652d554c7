"""Resume redoes a slide whose options, model or input changed since it was made; it skips only true repeats."""

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

REPO = Path(__file__).resolve().parents[1]
CORES = REPO / "sample_data" / "cores"
FAST = ["--target-mpp", "4", "--tile-size", "128", "--device", "cpu", "--mpp", "0.5"]
A, B = "slide001_core001", "slide001_core002"


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["run", *args, *FAST])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def cores(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in (A, B):
        shutil.copy(CORES / f"{name}.jpg", folder)
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_changed_k_and_seed_redo_the_slide(cores: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    image = str(cores / f"{A}.jpg")
    _run(image, "-o", str(out), "--n-clusters", "3")
    text = _run(image, "-o", str(out), "--n-clusters", "5", "--seed", "7")
    assert "1 slide(s) done, 0 skipped" in text
    assert "1 redone (options changed, model changed)" in text  # the run-wide KMeans changes with K and seed
    for table in (out / "biomarkers.csv", out / A / "biomarkers.csv"):
        (row,) = _rows(table)
        assert row["n_clusters"] == "5" and "c5_fraction" in row, table
    manifest = _manifest(out)
    assert manifest["options"]["segment"]["n_clusters"] == 5 and manifest["options"]["segment"]["seed"] == 7
    (slide,) = manifest["slides"]
    assert slide["status"] == "done" and slide["redone"] == ["options", "model"]
    assert all(r["n_clusters"] == 5 for r in slide["regions"])
    assert manifest["resume"]["redone"] == 1 and manifest["resume"]["redone_because"]["options changed"] == 1


def test_new_slide_and_changed_option_give_one_consistent_run(cores: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(str(cores / f"{A}.jpg"), "-o", str(out), "--n-clusters", "3")
    _run(str(cores / f"{A}.jpg"), str(cores / f"{B}.jpg"), "-o", str(out), "--n-clusters", "4")
    manifest = _manifest(out)
    assert [s["name"] for s in manifest["slides"]] == [A, B]
    assert all(s["status"] == "done" for s in manifest["slides"])
    assert manifest["options"]["segment"]["n_clusters"] == 4
    rows = _rows(out / "biomarkers.csv")
    assert [r["slide"] + "_" + r["region"] for r in rows] == [A, B]
    assert all(r["n_clusters"] == "4" and "c4_fraction" in r for r in rows)


def test_same_options_still_skip(cores: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    image = str(cores / f"{A}.jpg")
    _run(image, "-o", str(out), "--n-clusters", "3")
    record = out / A / "slide.json"
    stamp = record.stat().st_mtime_ns
    # --device and --batch-size do not change what a slide's outputs mean: still complete
    text = _run(image, "-o", str(out), "--n-clusters", "3", "--batch-size", "2")
    assert "0 slide(s) done, 1 skipped" in text and "redone" not in text
    assert record.stat().st_mtime_ns == stamp
    manifest = _manifest(out)
    assert manifest["slides"][0]["status"] == "skipped" and manifest["resume"]["redone"] == 0


def test_changed_input_file_is_redone(cores: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    image = cores / f"{A}.jpg"
    _run(str(image), "-o", str(out))
    before = _rows(out / "biomarkers.csv")[0]
    pixels = np.asarray(Image.open(CORES / f"{B}.jpg").convert("RGB"))
    Image.fromarray(np.ascontiguousarray(pixels[::-1])).save(image, quality=90)  # other pixels, same name
    text = _run(str(image), "-o", str(out))
    # the run-wide KMeans is refitted on the new pixels, so the model changed too
    assert "1 slide(s) done, 0 skipped" in text and "1 redone (model changed, input changed)" in text
    after = _rows(out / "biomarkers.csv")[0]
    assert after["tissue_area_um2"] != before["tissue_area_um2"]


def test_record_without_run_key_is_redone(cores: Path, tmp_path: Path) -> None:
    """A slide.json written before run keys existed cannot prove its options: the slide is redone."""
    out = tmp_path / "out"
    image = str(cores / f"{A}.jpg")
    _run(image, "-o", str(out))
    record = out / A / "slide.json"
    data = json.loads(record.read_text(encoding="utf-8"))
    for key in ("run_key", "redone"):
        data.pop(key, None)
    record.write_text(json.dumps(data), encoding="utf-8")
    text = _run(image, "-o", str(out))
    assert "1 slide(s) done, 0 skipped" in text and "1 redone (no run key: older version)" in text
    assert "run_key" in json.loads(record.read_text(encoding="utf-8"))


def test_changed_cluster_model_file_changes_the_key(tmp_path: Path) -> None:
    from equiseg_wsi.run_key import model_digest

    identity = {"source": "random-init seed=0"}
    model = tmp_path / "model.json"
    model.write_bytes(b"first")
    first = model_digest(identity, str(model))
    model.write_bytes(b"second")
    assert model_digest(identity, str(model)) != first
    assert model_digest(identity, None) != first


def test_merge_of_differing_tables_names_the_files(tmp_path: Path) -> None:
    from equiseg_wsi.errors import InputError
    from equiseg_wsi.options import ExtractorSpec, RunJob, RunOptions, SegmentOptions
    from equiseg_wsi.run_files import write_run_outputs
    from equiseg_wsi.slide_result import SlideResult

    job = RunJob(ExtractorSpec(device="cpu", target_mpp=4.0), RunOptions(segment=SegmentOptions(target_mpp=4.0)))
    three = {"slide": "a", "n_clusters": 3, "c3_fraction": 0.2}
    four = {"slide": "b", "n_clusters": 4, "c3_fraction": 0.2, "c4_fraction": 0.1}
    results = [SlideResult("a", "a.jpg", "done", regions=[three]), SlideResult("b", "b.jpg", "done", regions=[four])]
    with pytest.raises(InputError) as info:
        write_run_outputs(tmp_path, results, job)
    message = str(info.value)
    assert str(Path("a") / "biomarkers.csv") in message and str(Path("b") / "biomarkers.csv") in message
    assert "c4_fraction" in message
    assert (tmp_path / "manifest.json").is_file() and not (tmp_path / "biomarkers.csv").exists()
