"""`equiseg dearray` end to end on the sample TMA slide (3 x 4 cores, A-2 and B-1 missing)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from qupath_qptma import qupath_import

from equiseg_cli.main import cli
from equiseg_wsi.export.geojson import qupath_problems, read_geojson
from equiseg_wsi.export.qptma import read_qptma
from equiseg_wsi.export.tma_outputs import CORE_CSV_COLUMNS

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TMA = REPO / "sample_data" / "tma" / "tma_3x4.svs"
NOT_TMA = REPO / "sample_data" / "CMU-1-Small-Region.svs"  # one tissue section
MISSING = {"A-2", "B-1"}


def _invoke(*args: str) -> object:
    return CliRunner().invoke(cli, ["dearray", *args], obj={})


def test_dearray_writes_grid_outputs(tmp_path: Path) -> None:
    ids = tmp_path / "ids.csv"
    ids.write_text("core,case_id\nA-1,P-001\nC-4,P-012\nZ-99,P-999\n")
    out = tmp_path / "out"
    result = _invoke(str(SAMPLE_TMA), "-o", str(out), "--case-ids", str(ids))
    assert result.exit_code == 0, result.output
    assert "Z-99" in result.output  # a case id for a core not in the grid is reported
    assert "4 x 3 grid" in result.output and "10 cores present, 2 missing" in result.output

    grid = read_qptma(out / "tma_3x4.qptma")
    assert (grid.width, grid.height) == (4, 3)
    assert [c.name for c in grid.cores] == [f"{r}-{c}" for r in "ABC" for c in range(1, 5)]
    assert {c.name for c in grid.cores if not c.present} == MISSING
    assert grid.core(0, 0).case_id == "P-001" and grid.core(2, 3).case_id == "P-012"
    seen = qupath_import(out / "tma_3x4.qptma")  # as QuPath's importer reads it: the ids reach QuPath
    assert (seen["width"], seen["height"]) == (4, 3)
    assert dict(zip(seen["name"], seen["Case ID"], strict=True)) == {
        f"{r}-{c}": {"A-1": "P-001", "C-4": "P-012"}.get(f"{r}-{c}") for r in "ABC" for c in range(1, 5)
    }
    assert {n for n, p in zip(seen["name"], seen["present"], strict=True) if not p} == MISSING

    with open(out / "tma_3x4_cores.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CORE_CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 12 and rows[0]["case_id"] == "P-001"
    assert {r["name"] for r in rows if r["present"] == "False"} == MISSING
    assert (rows[5]["name"], rows[5]["row"], rows[5]["column"]) == ("B-2", "2", "2")

    collection = read_geojson(out / "tma_3x4_cores.geojson")
    assert qupath_problems(collection) == []
    assert [f["properties"]["name"] for f in collection["features"]] == [c.name for c in grid.cores]

    with Image.open(out / "tma_3x4_grid.png") as png:
        assert png.format == "PNG" and max(png.size) <= 1600


def test_dearray_labels_and_naming(tmp_path: Path) -> None:
    result = _invoke(
        str(SAMPLE_TMA), "-o", str(tmp_path), "--row-labels", "1-3", "--col-labels", "A-D", "--column-first",
        "--core-diameter", "600", "-q",
    )
    assert result.exit_code == 0, result.output
    assert result.output == ""
    grid = read_qptma(tmp_path / "tma_3x4.qptma")
    assert [c.name for c in grid.cores[:5]] == ["A-1", "B-1", "C-1", "D-1", "A-2"]
    assert {c.name for c in grid.cores if not c.present} == {"B-1", "A-2"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--row-labels", "A-B"], "row labels"),
        (["--col-labels", "1,2,2,3"], "column labels"),
        (["--tissue-mpp", "0"], "Invalid value"),
    ],
)
def test_dearray_bad_options_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = _invoke(str(SAMPLE_TMA), "-o", str(tmp_path), *args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_dearray_without_cores_or_mpp(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (245, 244, 242)).save(blank)
    result = _invoke(str(blank), "-o", str(tmp_path / "o"), "--mpp", "4")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"Error: {blank}: no TMA cores found")
    result = _invoke(str(blank), "-o", str(tmp_path / "o"))
    assert result.exit_code == 1 and "mpp" in result.output


def test_dearray_refuses_a_slide_that_is_not_a_tma(tmp_path: Path) -> None:
    """One tissue section would be a 1 x 1 'grid': it fails in one line naming why, and writes nothing."""
    out = tmp_path / "out"
    result = _invoke(str(NOT_TMA), "-o", str(out))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {NOT_TMA}: does not look like a TMA: "), result.output
    assert "core-sized" in lines[0] and "--tma" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_dearray_tma_flag_forces_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "equiseg_cli.main", "dearray", str(NOT_TMA), "-o", str(out), "--tma", "-q"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Warning: {NOT_TMA} does not look like a TMA: "), proc.stderr
    assert read_qptma(out / "CMU-1-Small-Region.qptma").width == 1
    # a real TMA passes without a warning, with or without the flag
    result = _invoke(str(SAMPLE_TMA), "-o", str(tmp_path / "tma"), "--tma", "-q")
    assert result.exit_code == 0 and result.output == ""
