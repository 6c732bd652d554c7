"""Scratch files (a large region's memory-mapped features) live in the output folder's temporary area, are
removed when the region is done, and what a killed run left there is removed by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import copy_sample_cores

from equiseg_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
FAST = ["--target-mpp", "4", "--tile-size", "128", "--device", "cpu", "--mpp", "0.5", "-q"]
# every region's features go to a scratch file, however small
ALWAYS_SCRATCH = ("import sys, equiseg_wsi.segment as s; s.IN_MEMORY_FEATURE_BYTES = 0; "
                  "from equiseg_cli.main import cli; cli(sys.argv[1:])")


@pytest.fixture
def cores(tmp_path: Path) -> Path:
    return copy_sample_cores(tmp_path / "in", 6)


def _scratch_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("features.npy")]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_scratch_of_a_killed_run_stays_in_the_output_folder_and_goes_on_the_next_run(
    cores: Path, tmp_path: Path
) -> None:
    tmpdir, out = tmp_path / "tmpdir", tmp_path / "out"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", ALWAYS_SCRATCH, "run", str(cores), "-o", str(out), *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not _scratch_files(tmpdir, out):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it wrote a scratch file"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(tmpdir.glob("equiseg-*")), "scratch in TMPDIR"
    assert _scratch_files(out), "the killed run's scratch file is not in the output folder's temporary area"
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert not _scratch_files(tmpdir, out)
    assert not list(tmpdir.iterdir())
    area = out / ".equiseg-tmp"
    assert not area.exists() or not list(area.iterdir())


def test_only_dead_processes_scratch_is_removed(tmp_path: Path) -> None:
    from equiseg_wsi.scratch import remove_stale_scratch, scratch_folder

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_dir = scratch_folder(tmp_path, pid=gone.pid)
        live_dir = scratch_folder(tmp_path, pid=alive.pid)
        other_host = scratch_folder(tmp_path, pid=gone.pid, host="elsewhere")
        for folder in (dead_dir, live_dir, other_host):
            folder.mkdir(parents=True)
            (folder / "features.npy").write_bytes(b"x")
        assert remove_stale_scratch(tmp_path) == 1
        assert not dead_dir.exists() and live_dir.exists() and other_host.exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_run_uses_and_removes_scratch_in_the_output_folder(
    cores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    import equiseg_wsi.segment as segment

    monkeypatch.setattr(segment, "IN_MEMORY_FEATURE_BYTES", 0)
    made: list[Path] = []
    open_memmap = np.lib.format.open_memmap

    def recording(filename: str | os.PathLike[str], *args: object, **kw: object) -> np.memmap:
        made.append(Path(filename))
        return open_memmap(filename, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(np.lib.format, "open_memmap", recording)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(cores / "c0.jpg"), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert made and all(p.is_relative_to(out / ".equiseg-tmp") for p in made), made
    assert not any(p.exists() or p.parent.exists() for p in made)
