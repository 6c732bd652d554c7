"""One run at a time per output folder: a second run on the same folder fails at once with a clear message."""

from __future__ import annotations

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
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(inputs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "equiseg_cli.main", "run", str(inputs), "-o", str(out), *FAST, *extra]


def _wait_for(predicate: object, proc: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("the first run ended (or never got going) before the check")


def _lock_holder(out: Path) -> subprocess.Popen[str]:
    """Another process holding `out`'s lock (returns once it holds it)."""
    code = ("import sys, time; from pathlib import Path; from equiseg_wsi.run_lock import output_lock\n"
            "with output_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_run_on_the_same_folder_fails_at_once(tmp_path: Path) -> None:
    # more work than the check needs: the first run is stopped once it is done. Each slide computes its own
    # features (`--clustering region`), so slides are still being segmented while the second run is tried. With
    # the run-wide fit, every feature was computed before the first slide was written, and the 80 slides were
    # then segmented in about the time the second run took to fail: the SIGTERM came while the run files were
    # written, and the manifest this test reads was (rightly) not.
    inputs = copy_sample_cores(tmp_path / "in", 80, "c{i:02d}.jpg")
    out = tmp_path / "out"
    first = subprocess.Popen(_cmd(inputs, out, "--clustering", "region"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=ENV)
    try:
        _wait_for(lambda: any(out.glob("*/slide.json")), first)
        started = time.monotonic()
        second = subprocess.run(_cmd(inputs, out), capture_output=True, text=True, env=ENV, timeout=120)
        took = time.monotonic() - started
        assert first.poll() is None, "the first run finished before the second one was tried"
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert second.returncode == 1, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert str(out) in lines[0] and "another equiseg run" in lines[0] and f"pid {first.pid}" in lines[0]
    assert took < 30  # at once: before any model is built or slide read
    # the second run touched nothing: the first one's manifest lists what the first one completed
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    done = {s["name"] for s in manifest["slides"] if s["status"] == "done"}
    assert done == {p.parent.name for p in out.glob("*/slide.json")}, err


def test_the_lock_is_free_again_after_a_run(tmp_path: Path) -> None:
    from equiseg_wsi.run_lock import OutputBusyError, output_lock

    out = tmp_path / "out"
    holder = _lock_holder(out)
    try:
        with pytest.raises(OutputBusyError, match=rf"another equiseg run \(pid {holder.pid} "):
            with output_lock(out):
                pass
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait()
    with output_lock(out):
        with output_lock(out):  # re-entered by the same process (the CLI, then the runner)
            pass


@pytest.mark.parametrize("command", ["intra", "inter"])
def test_intra_and_inter_take_the_same_lock(tmp_path: Path, command: str) -> None:
    out = tmp_path / "out"
    holder = _lock_holder(out)
    try:
        cmd = [sys.executable, "-m", "equiseg_cli.main", command, "--csv_path",
               str(REPO / "sample_data" / "cores" / "manifest.csv"), "--output_path", str(out), "-q"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1, done.stderr
    assert f"another equiseg run (pid {holder.pid} " in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not any(out.glob("*/slide.json"))
