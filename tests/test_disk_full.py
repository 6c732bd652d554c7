"""A full or read-only output folder mid-run: exit 1, one line naming the folder and the cause, the slides
that completed recorded, nothing truncated; a rerun once there is room resumes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from equiseg_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
CORES = REPO / "sample_data" / "cores"
FAST = ["--target-mpp", "4", "--tile-size", "128", "--device", "cpu", "--mpp", "0.5", "-q"]
NAMES = ["slide001_core001", "slide001_core002", "slide002_core001"]
_replace = os.replace


@pytest.fixture
def cores(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in NAMES:
        shutil.copy(CORES / f"{name}.jpg", folder)
    return folder


def _fail_when(monkeypatch: pytest.MonkeyPatch, hit: Any, error: OSError) -> None:
    """Every atomic rename onto a final name for which `hit(target)` holds fails with `error`."""

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        if hit(Path(dst)):
            raise error
        _replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)


def _invoke(cores: Path, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(cli, ["run", str(cores), "-o", str(out), *FAST, *extra])


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


def _no_partial_files(out: Path) -> None:
    assert not list(out.rglob(".tmp-*"))
    assert not [p for p in out.rglob("[!.]*") if p.is_file() and p.stat().st_size == 0]


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EROFS, "Read-only file system", "/somewhere/.tmp-123-abc-x.geojson"),
])
def test_full_disk_mid_run_stops_with_one_line_and_records_what_completed(
    cores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    out = tmp_path / "out"
    _fail_when(monkeypatch, lambda p: p.parent.name == NAMES[1] and p.suffix == ".geojson", error)
    result = _invoke(cores, out)
    assert result.exit_code == 1, result.output
    lines = _error_lines(result.output)
    assert len(lines) == 1, result.output
    assert str(out) in lines[0] and error.strerror in lines[0] and ".tmp-" not in lines[0]
    assert "OSError" not in lines[0]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    status = {s["name"]: s["status"] for s in manifest["slides"]}
    # slides are segmented two at a time: the third may have started (and then finished) before the failure
    third = status.pop(NAMES[2])
    assert status == {NAMES[0]: "done", NAMES[1]: "failed"} and third in ("stopped", "done")
    assert error.strerror in manifest["stopped"]
    assert (out / NAMES[0] / "slide.json").is_file() and not (out / NAMES[1] / "slide.json").exists()
    if third == "stopped":  # the run stopped: no slide started after the failure
        assert not (out / NAMES[2]).exists()
    else:
        assert (out / NAMES[2] / "slide.json").is_file()
    _no_partial_files(out)
    monkeypatch.setattr(os, "replace", _replace)  # space again: the rerun resumes
    again = _invoke(cores, out)
    assert again.exit_code == 0, again.output
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [s["status"] for s in manifest["slides"]] == ["skipped", "done", "done" if third == "stopped" else "skipped"]


def test_full_disk_while_writing_the_manifest_leaves_no_stale_one(
    cores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert _invoke(cores, out).exit_code == 0
    run_files = ("manifest.json", "biomarkers.csv")
    full = OSError(errno.ENOSPC, "No space left on device")
    _fail_when(monkeypatch, lambda p: p.parent == out and p.name in run_files, full)
    result = _invoke(cores, out, "--n-clusters", "4")  # every slide is redone; only the run files fail
    assert result.exit_code == 1, result.output
    lines = _error_lines(result.output)
    assert len(lines) == 1 and str(out) in lines[0] and "No space left on device" in lines[0], result.output
    assert "manifest" in lines[0]
    # the earlier run's manifest and table would pass for this run's: gone, and each slide's record stands
    assert not (out / "manifest.json").exists() and not (out / "biomarkers.csv").exists()
    for name in NAMES:
        assert json.loads((out / name / "slide.json").read_text(encoding="utf-8"))["regions"][0]["n_clusters"] == 4
    _no_partial_files(out)


def test_full_disk_at_the_slide_record_stops_the_run(
    cores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _fail_when(monkeypatch, lambda p: p.name == "slide.json", OSError(errno.ENOSPC, "No space left on device"))
    result = _invoke(cores, out)
    assert result.exit_code == 1, result.output
    assert len(_error_lines(result.output)) == 1 and str(out) in result.output
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    # slides are segmented two at a time: the one running beside the first meets the same full disk
    statuses = [s["status"] for s in manifest["slides"]]
    assert statuses[0] == "failed" and statuses[1] in ("failed", "stopped") and statuses[2] == "stopped"
    for s in manifest["slides"]:
        if s["status"] == "failed":
            assert str(out) in s["error"] and "No space left" in s["error"], s["error"]
