"""An interrupted TMA slide is resumed per core: the rerun redoes only the cores that were not finished, and
its outputs are byte-identical to an uninterrupted run's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import equiseg_wsi.region_outputs as region_outputs
import equiseg_wsi.runner as runner
from equiseg_cli.main import cli
from equiseg_wsi import forked

REPO = Path(__file__).resolve().parents[1]
TMA = REPO / "sample_data" / "tma" / "tma_3x4.svs"
FAST = ["--target-mpp", "5", "--tile-size", "128", "--device", "cpu", "-q"]
SEGMENT: Callable[..., Any] = region_outputs.segment_region


def _counting(monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> list[str]:
    """The regions whose segmentation started, in order; Ctrl-C arrives as region number `stop_at` starts."""
    calls: list[str] = []

    def counted(slide: Any, area: Any, *args: Any, **kw: Any) -> Any:
        calls.append(area.name)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return SEGMENT(slide, area, *args, **kw)

    monkeypatch.setattr(region_outputs, "segment_region", counted)
    return calls


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix in (".geojson", ".csv", ".png", ".qptma")}


def test_an_interrupted_tma_redoes_only_its_unfinished_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner.InProcess.__init__, "__defaults__", (1,))  # one core at a time: a known order
    reference = tmp_path / "reference"
    everything = _counting(monkeypatch)
    assert CliRunner().invoke(cli, ["run", str(TMA), "-o", str(reference), *FAST]).exit_code == 0
    assert len(everything) >= 8

    out = tmp_path / "out"
    before = _counting(monkeypatch, stop_at=5)
    stopped = CliRunner().invoke(cli, ["run", str(TMA), "-o", str(out), *FAST])
    assert stopped.exit_code == 130, stopped.output
    assert before == everything[:5] and not (out / "tma_3x4" / "slide.json").exists()

    after = _counting(monkeypatch)
    again = CliRunner().invoke(cli, ["run", str(TMA), "-o", str(out), *FAST])
    assert again.exit_code == 0, again.output
    assert after == everything[4:]  # the four finished cores are not redone
    assert _outputs(out) == _outputs(reference)
    record = json.loads((out / "tma_3x4" / "slide.json").read_text(encoding="utf-8"))
    assert [r["region"] for r in record["regions"] if r["region"] in everything] == everything
    assert not [p for p in (out / "tma_3x4").iterdir() if p.name.startswith(".")]  # no per-core records left

    # per-core records count only for the options that made them
    redo = _counting(monkeypatch, stop_at=3)
    assert CliRunner().invoke(cli, ["run", str(TMA), "-o", str(out), *FAST, "--n-clusters", "4"]).exit_code == 130
    assert redo == everything[:3]
    other = _counting(monkeypatch, stop_at=1)
    assert CliRunner().invoke(cli, ["run", str(TMA), "-o", str(out), *FAST, "--n-clusters", "5"]).exit_code == 130
    assert other == everything[:1]


def test_a_tma_stopped_while_its_cores_run_two_at_a_time_resumes(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One TMA slide's cores are segmented two at a time (threads here, to see the calls): Ctrl-C lets the running
    cores finish and keeps them, and the rerun redoes exactly the others, with the outputs of an uninterrupted run."""
    monkeypatch.setattr(forked, "USE_PROCESSES", False)
    reference = tmp_path / "reference"
    everything = _counting(monkeypatch)
    assert CliRunner().invoke(cli, ["run", str(TMA), "-o", str(reference), *FAST]).exit_code == 0
    assert len(everything) >= 8

    out = tmp_path / "out"
    _counting(monkeypatch, stop_at=5)
    assert CliRunner().invoke(cli, ["run", str(TMA), "-o", str(out), *FAST]).exit_code == 130
    kept = {p.stem for p in (out / "tma_3x4" / region_outputs.REGION_RECORDS).glob("*.json")}
    assert 3 <= len(kept) < len(everything) and not (out / "tma_3x4" / "slide.json").exists()

    after = _counting(monkeypatch)
    assert CliRunner().invoke(cli, ["run", str(TMA), "-o", str(out), *FAST]).exit_code == 0
    assert sorted(after) == sorted(set(everything) - kept)
    assert _outputs(out) == _outputs(reference)
