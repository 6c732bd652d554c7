"""Scale-out and resumability: a real Dask scheduler gives the same outputs as the in-process run, and a run
killed with SIGKILL and rerun gives the same outputs as an uninterrupted one, with no stray temporaries."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from equiseg_cli.main import cli
from equiseg_wsi.export.atomic import temporary_name

REPO = Path(__file__).resolve().parents[1]
FAST = ["--target-mpp", "4", "--tile-size", "128", "--device", "cpu", "--quiet"]
OUTPUT_SUFFIXES = (".geojson", ".csv", ".png", ".qptma")


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    shutil.copytree(REPO / "sample_data" / "cores", folder / "cores")
    shutil.copy(REPO / "sample_data" / "CMU-1-Small-Region.svs", folder)
    return folder


@pytest.fixture(scope="module")
def reference(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    result = CliRunner().invoke(cli, ["run", str(slides), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    return out


def _outputs(out: Path) -> dict[str, bytes]:
    """Files under their final names; a killed run's hidden temporaries (`.tmp-…`) are not outputs."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.suffix in OUTPUT_SUFFIXES and not p.name.startswith(".tmp-")}


def test_dask_scheduler_gives_the_same_outputs(slides: Path, reference: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env={"OMP_NUM_THREADS": "1"}) as cluster:
        out = tmp_path / "dask"
        result = CliRunner().invoke(cli, ["run", str(slides), "-o", str(out), "--scheduler",
                                          cluster.scheduler_address, *FAST])
    assert result.exit_code == 0, result.output
    expected = _outputs(reference)
    assert len(expected) >= 15
    assert _outputs(out) == expected


def test_sigkill_then_rerun_matches_an_uninterrupted_run(slides: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "equiseg_cli.main", "run", str(slides), "-o", str(out), *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("*/slide.json"))) >= 2:  # mid-way: some slides done, others not started
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reference_files = _outputs(reference)
    for name, data in _outputs(out).items():  # whatever exists under a final name is complete
        assert data == reference_files[name], name
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _outputs(out) == reference_files
    assert not list(out.rglob(".tmp-*"))


def test_a_rerun_removes_the_temporary_a_killed_write_left(reference: Path, slides: Path, tmp_path: Path) -> None:
    """What SIGKILL mid-write leaves (a hidden `.tmp-…` next to its target) is gone after the rerun, and the slide
    it was in is redone to the uninterrupted run's bytes (CI once killed the run inside such a write)."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    folder = next(p.parent for p in sorted(out.glob("*/slide.json")))
    (folder / "slide.json").unlink()
    overlay = next(folder.glob("*_overlay.png"))
    left = temporary_name(overlay)  # the name atomic_path gives a write in progress
    left.write_bytes(overlay.read_bytes()[:100])
    overlay.unlink()
    result = CliRunner().invoke(cli, ["run", str(slides), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert not left.exists() and not list(out.rglob(".tmp-*"))
    assert _outputs(out) == _outputs(reference)
