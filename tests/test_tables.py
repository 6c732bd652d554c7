"""The one CSV writer: deterministic bytes, and no cell a spreadsheet would run as a formula (CSV injection)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from click.testing import CliRunner

from equiseg_cli.main import cli
from equiseg_wsi.export.table import write_table

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "sample_data" / "cores" / "slide001_core001.jpg"
HOSTILE = ["=1+2", "=cmd|' -C calc'!A0", "+SUM(1;2)", "@SUM(1)", "-dash", "\t=x", "\r=y"]


def test_text_that_starts_a_formula_is_quoted_and_numbers_are_not(tmp_path: Path) -> None:
    rows = [{"name": n, "value": -0.5} for n in HOSTILE] + [{"name": "plain", "value": 3}]
    path = write_table(tmp_path / "t.csv", rows)
    back = list(csv.DictReader(path.open(encoding="utf-8", newline="")))
    assert [r["name"] for r in back] == ["'" + n.replace("\r", " ") for n in HOSTILE] + ["plain"]
    assert [r["value"] for r in back] == ["-0.5"] * len(HOSTILE) + ["3"]


def test_run_quotes_hostile_slide_names_and_case_ids(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(CORE, inputs / "=1+2.jpg")
    (inputs / "manifest.csv").write_text('path,mpp,case_id\n=1+2.jpg,0.499,"=HYPERLINK(""http://x"")"\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(inputs), "-o", str(out), "--device", "cpu", "--target-mpp", "8",
                                      "--tile-size", "128", "-q"])
    assert result.exit_code == 0, result.output
    for table in (out / "biomarkers.csv", next(out.glob("*/biomarkers.csv"))):
        row = next(csv.DictReader(table.open(encoding="utf-8", newline="")))
        assert row["slide"] == "'=1+2" and row["case_id"] == "'=HYPERLINK(\"http://x\")", row
        assert not any(v.startswith(("=", "+", "@")) for v in row.values())
