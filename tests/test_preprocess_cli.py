"""`equiseg preprocess` end to end on the sample cores."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from equiseg_cli.main import cli
from equiseg_wsi.cores import PREPROCESS_COLUMNS

CORES = Path(__file__).resolve().parents[1] / "sample_data" / "cores"
NAMES = ["slide001_core001", "slide001_core002", "slide002_core001", "slide002_core002"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == PREPROCESS_COLUMNS
        return list(reader)


@pytest.mark.parametrize("spelling", ["-", "_"])
def test_preprocess_sample_cores(tmp_path: Path, spelling: str) -> None:
    out, table = tmp_path / "out", tmp_path / "cores.csv"
    args = [
        "preprocess",
        f"--input{spelling}folder", str(CORES),
        f"--output{spelling}folder", str(out),
        f"--output{spelling}csv", str(table),
    ]
    result = CliRunner().invoke(cli, args, obj={})
    assert result.exit_code == 0, result.output
    rows = _rows(table)
    assert [(r["slide"], r["core"]) for r in rows] == [tuple(n.split("_")) for n in NAMES]
    for row, name in zip(rows, NAMES, strict=True):
        assert Path(row["path"]) == (CORES / f"{name}.jpg").resolve()
        assert Path(row["processed"]) == (out / f"{name}_masked.jpg").resolve() and Path(row["processed"]).is_file()
        assert Path(row["mask_path"]) == (out / f"{name}_mask.png").resolve() and Path(row["mask_path"]).is_file()
        assert float(row["mpp"]) == 0.499  # from manifest.csv, found next to the images
        assert 0.0 < float(row["tissue_fraction"]) < 1.0
    assert float(rows[3]["tissue_fraction"]) < 0.3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}_masked.jpg" for n in NAMES] + [f"{n}_mask.png" for n in NAMES]
    )


def test_one_bad_file_among_good(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in NAMES[2:]:
        shutil.copyfile(CORES / f"{name}.jpg", src / f"{name}.jpg")
    (src / "slide003_core001.jpg").write_bytes(b"\xff\xd8 truncated, not a JPEG")
    table = tmp_path / "t.csv"
    result = CliRunner().invoke(
        cli,
        ["preprocess", "--input-folder", str(src), "--output-folder", str(tmp_path / "o"), "--output-csv", str(table),
         "--mpp", "0.499", "--quiet"],
        obj={},
    )
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "slide003_core001.jpg" in errors[0]
    assert "Traceback" not in result.output
    assert [r["slide"] for r in _rows(table)] == ["slide002", "slide002"]


def test_mpp_missing_fails_each_file_clearly(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(CORES / "slide001_core001.jpg", src / "slide001_core001.jpg")
    result = CliRunner().invoke(
        cli, ["preprocess", "--input-folder", str(src), "--output-folder", str(tmp_path / "o"),
              "--output-csv", str(tmp_path / "t.csv")], obj={},
    )
    assert result.exit_code == 1
    assert "slide001_core001.jpg" in result.output and "--mpp" in result.output


def test_empty_folder_and_help(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["preprocess", "--input-folder", str(tmp_path), "--output-folder", str(tmp_path / "o"),
              "--output-csv", str(tmp_path / "t.csv")], obj={},
    )
    assert result.exit_code == 1 and "no slide or image files" in result.output
    help_text = CliRunner().invoke(cli, ["preprocess", "--help"], obj={}).output
    for needle in ("--input_folder", "--tissue-mpp", "µm/px", "µm²", "default: 8.0"):
        assert needle in help_text
