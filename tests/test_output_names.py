"""A slide keeps its output folder name for as long as the output folder lives, whatever else is in the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from equiseg_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
CORES = REPO / "sample_data" / "cores"
FAST = ["--target-mpp", "4", "--tile-size", "128", "--device", "cpu", "--mpp", "0.5", "-q"]


def _run(*args: str) -> None:
    result = CliRunner().invoke(cli, ["run", *args, *FAST])
    assert result.exit_code == 0, result.output


def _record(folder: Path) -> str:
    return str(json.loads((folder / "slide.json").read_text(encoding="utf-8"))["path"])


@pytest.fixture
def two_x(tmp_path: Path) -> tuple[Path, Path]:
    """d1/x.jpg and d2/x.jpg: two different images that share a stem."""
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    shutil.copy(CORES / "slide001_core001.jpg", d1 / "x.jpg")
    shutil.copy(CORES / "slide002_core002.jpg", d2 / "x.jpg")
    return d1, d2


def test_a_later_run_with_fewer_inputs_keeps_every_name(two_x: tuple[Path, Path], tmp_path: Path) -> None:
    """run d1 d2, then run d2 alone: d2/x.jpg is still x-2, and d1's x is neither overwritten nor stale."""
    d1, d2 = two_x
    out = tmp_path / "T"
    _run(str(d1), str(d2), "-o", str(out))
    assert _record(out / "x") == str(d1 / "x.jpg") and _record(out / "x-2") == str(d2 / "x.jpg")
    first = (out / "x" / "x.geojson").read_bytes()
    _run(str(d2), "-o", str(out))
    assert _record(out / "x") == str(d1 / "x.jpg") and (out / "x" / "x.geojson").read_bytes() == first
    assert _record(out / "x-2") == str(d2 / "x.jpg")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [(s["name"], s["path"]) for s in manifest["slides"]] == [("x-2", str(d2 / "x.jpg"))]


def test_a_new_file_with_a_used_stem_gets_a_new_name(two_x: tuple[Path, Path], tmp_path: Path) -> None:
    """run d1, then run d2: d2/x.jpg must not take over d1's folder x."""
    d1, d2 = two_x
    out = tmp_path / "T"
    _run(str(d1), "-o", str(out))
    first = (out / "x" / "x.geojson").read_bytes()
    _run(str(d2), "-o", str(out))
    assert _record(out / "x") == str(d1 / "x.jpg") and (out / "x" / "x.geojson").read_bytes() == first
    assert _record(out / "x-2") == str(d2 / "x.jpg")
    _run(str(d2), str(d1), "-o", str(out))  # the order of the inputs does not matter either
    assert _record(out / "x") == str(d1 / "x.jpg") and _record(out / "x-2") == str(d2 / "x.jpg")
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["x", "x-2"]


def test_names_of_an_older_output_folder_are_kept(two_x: tuple[Path, Path], tmp_path: Path) -> None:
    """A folder made before names were remembered: its slide records claim their names."""
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.output_names import NAMES_FILE, stable_names

    d1, d2 = two_x
    out = tmp_path / "T"
    _run(str(d1), str(d2), "-o", str(out))
    (out / NAMES_FILE).unlink()
    (named,) = stable_names(collect_inputs([d2]), out)
    assert named.name == "x-2"
