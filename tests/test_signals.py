"""SIGTERM, SIGHUP and Ctrl-C stop a run cleanly: one line on stderr, a manifest and table of what completed,
no temporaries or scratch left, a non-zero exit (128 + signal number); a rerun resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_sample_cores

REPO = Path(__file__).resolve().parents[1]
FAST = ["--target-mpp", "4", "--tile-size", "128", "--device", "cpu", "--mpp", "0.5", "-q"]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


N_CORES = 8


def _default_handlers() -> None:
    """In the child: the signals under test get their default handling back. A test suite started with nohup,
    or in the background of a non-interactive shell, passes SIGHUP / SIGINT on as ignored, and an ignored signal
    is meant to stay ignored (`stop_on_signals`): the run would then finish instead of stopping."""
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM), signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


@pytest.fixture
def cores(tmp_path: Path) -> Path:
    return copy_sample_cores(tmp_path / "in", N_CORES, "c{i:02d}.jpg")


@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM), signal.SIGINT])
def test_signal_stops_the_run_and_records_what_completed(cores: Path, tmp_path: Path, signum: int) -> None:
    out, tmpdir = tmp_path / "out", tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)}
    cmd = [sys.executable, "-m", "equiseg_cli.main", "run", str(cores), "-o", str(out), *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_handlers)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not any(out.glob("*/slide.json")):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    lines = [line for line in err.splitlines() if line and not line.startswith("Warning:")]
    assert len(lines) == 1 and name in lines[0] and "manifest.json" in lines[0], err
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    complete = {p.parent.name for p in out.glob("*/slide.json")}
    status = {s["name"]: s["status"] for s in manifest["slides"]}
    assert len(status) == N_CORES and {n for n, s in status.items() if s == "done"} == complete
    assert set(status.values()) == {"done", "stopped"}
    assert manifest["stopped"] == name and manifest["summary"]["done"] == len(complete)
    with open(out / "biomarkers.csv", newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == len(complete)
    assert not list(out.rglob(".tmp-*")) and not list(tmpdir.iterdir())
    area = out / ".equiseg-tmp"
    assert not area.exists() or not list(area.iterdir())
    rerun = subprocess.run(cmd[:-1], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(complete)} skipped" in rerun.stderr
