"""Input names and manifests: no two slides share an output folder, and a manifest never says two things."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from equiseg_cli.main import cli
from equiseg_wsi.errors import InputError
from equiseg_wsi.inputs import collect_inputs

REPO = Path(__file__).resolve().parents[1]
CORES = REPO / "sample_data" / "cores"


def test_a_counter_name_that_is_another_files_stem_is_skipped(tmp_path: Path) -> None:
    """a.jpg, a.png and a-2.jpg get three different names (a.png used to be named a-2 as well)."""
    for name in ("a.jpg", "a.png", "a-2.jpg"):
        shutil.copy(CORES / "slide001_core001.jpg", tmp_path / name)
    sources = collect_inputs([tmp_path], mpp=0.499)
    names = {s.path.name: s.name for s in sources}
    assert len(set(names.values())) == 3 and names["a-2.jpg"] == "a-2"


def test_run_keeps_every_slide_of_colliding_names(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.jpg", "a.png", "a-2.jpg"):
        shutil.copy(CORES / "slide001_core002.jpg", inputs / name)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(inputs), "-o", str(out), "--mpp", "0.499", "--device", "cpu",
                                      "--target-mpp", "8", "--tile-size", "128", "-q"])
    assert result.exit_code == 0, result.output
    records = [json.loads(p.read_text()) for p in out.glob("*/slide.json")]
    assert sorted(Path(r["path"]).name for r in records) == ["a-2.jpg", "a.jpg", "a.png"]


def test_manifest_rows_that_disagree_on_mpp_are_refused_with_their_lines(tmp_path: Path) -> None:
    shutil.copy(CORES / "slide001_core001.jpg", tmp_path / "x.jpg")
    (tmp_path / "m.csv").write_text("path,mpp\nx.jpg,0.5\nx.jpg,2.0\n")
    with pytest.raises(InputError, match=r"line 2 and line 3 list x.jpg with different mpp \(0.5 and 2.0\)"):
        collect_inputs([tmp_path / "m.csv"])
    (tmp_path / "same.csv").write_text("path,mpp\nx.jpg,0.5\nx.jpg,0.5\n")
    assert len(collect_inputs([tmp_path / "same.csv"])) == 1


@pytest.mark.parametrize("value", ["inf", "1e9", "nan", "0.001"])
def test_implausible_manifest_mpp_names_the_manifest_and_line(tmp_path: Path, value: str) -> None:
    shutil.copy(CORES / "slide001_core001.jpg", tmp_path / "x.jpg")
    (tmp_path / "m.csv").write_text(f"path,mpp\nx.jpg,{value}\n")
    with pytest.raises(InputError, match=r"m\.csv, line 2: mpp .* is outside 0.01..50"):
        collect_inputs([tmp_path / "m.csv"])
