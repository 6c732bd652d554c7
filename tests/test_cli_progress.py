"""What `equiseg` prints while it works (issue 17, build 6): log lines when stderr is not a terminal, bars that
leave no stale line under the summary, --debug/-v after the command name, and the missing Dask extra."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from equiseg_cli.main import cli
from equiseg_cli.progress import Progress

REPO = Path(__file__).resolve().parents[1]
CORES = REPO / "sample_data" / "cores"
FAST = ["--device", "cpu", "--target-mpp", "4", "--tile-size", "128", "--mpp", "0.5"]
CLOCK = r"\d\d:\d\d:\d\d"


def screen(data: str) -> list[str]:
    """The rows a terminal shows after `data` (CR, LF, cursor up, erase to end of line; LF also returns the
    carriage, as a pty's default ONLCR does)."""
    rows: dict[int, list[str]] = {}
    r = c = 0
    i = 0
    while i < len(data):
        ch = data[i]
        if ch == "\x1b":
            m = re.match(r"\x1b\[([0-9;?]*)([A-Za-z])", data[i:])
            if m:
                n = int(m.group(1)) if m.group(1).isdigit() else 1
                if m.group(2) == "A":
                    r = max(0, r - n)
                elif m.group(2) == "B":
                    r += n
                elif m.group(2) == "K":
                    rows.setdefault(r, [])[c:] = []
                i += m.end()
                continue
        if ch == "\r":
            c = 0
        elif ch == "\n":
            r, c = r + 1, 0
        else:
            line = rows.setdefault(r, [])
            while len(line) <= c:
                line.append(" ")
            line[c] = ch
            c += 1
        i += 1
    return ["".join(rows.get(k, [])).rstrip() for k in range(max(rows, default=-1) + 1)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_run_with_stderr_redirected_to_a_file_logs_one_line_per_slide(tmp_path: Path) -> None:
    log = tmp_path / "log"
    images = [str(CORES / "slide001_core002.jpg"), str(CORES / "slide002_core001.jpg")]
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "equiseg_cli.main", "run", *images, "-o", str(tmp_path / "out"),
                               *FAST], stderr=err, stdout=subprocess.PIPE, env=_env(), cwd=tmp_path, timeout=300)
    text = log.read_text()
    assert proc.returncode in (0, 1), text
    assert re.search(rf"^{CLOCK} 2 slide\(s\) to process", text, re.M), text
    for i, name in ((1, "slide001_core002"), (2, "slide002_core001")):
        assert re.search(rf"^{CLOCK} slide {i}/2 {name}: (done|failed|skipped)", text, re.M), text
    assert "\r" not in text and "\x1b" not in text  # no bar drawn into a file
    assert re.search(r"^\d+ slide\(s\) done, ", text, re.M), text  # the summary, on its own line


def test_lines_mode_writes_a_heartbeat_while_a_slide_is_running() -> None:
    out = io.StringIO()
    with Progress(3, stream=out, interval=0.2, tty=False) as progress:
        progress.start(0, "big-slide")
        progress.units(12, 40, "tiles")
        time.sleep(0.9)
        progress.finish(0, "big-slide", "done (1 region(s), 0.9 s)")
    lines = out.getvalue().splitlines()
    assert re.fullmatch(rf"{CLOCK} 3 slide\(s\) to process.*", lines[0])
    beats = [ln for ln in lines if "slide 1/3 big-slide: 12/40 tiles, running for" in ln]
    assert len(beats) >= 2, lines  # one per interval, not one per callback
    assert re.fullmatch(rf"{CLOCK} slide 1/3 big-slide: done \(1 region\(s\), 0.9 s\)", lines[-1])


def test_quiet_writes_nothing() -> None:
    out = io.StringIO()
    with Progress(2, quiet=True, stream=out, interval=0.05, tty=False) as progress:
        progress.start(0, "a")
        time.sleep(0.2)
        progress.finish(0, "a", "done")
    assert out.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_leave_the_cursor_on_a_fresh_line_for_the_summary() -> None:
    term = _Terminal()
    with Progress(2, stream=term) as progress:
        for i in range(2):
            progress.start(i, f"s{i}")
            for t in range(5):
                progress.units(t + 1, 5, "tiles")
            progress.finish(i, f"s{i}", "done")
    term.write("2 slide(s) done, summary\n")
    rows = screen(term.getvalue())
    assert rows[-1] == "2 slide(s) done, summary" and rows[0].startswith("slides: 100%"), rows
    assert not any("tiles" in row for row in rows), rows  # the inner bar is gone, not left above or beside


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal (POSIX)")
def test_run_on_a_terminal_prints_the_summary_on_its_own_line(tmp_path: Path) -> None:
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    images = [str(CORES / "slide001_core002.jpg"), str(CORES / "slide002_core001.jpg")]
    proc = subprocess.Popen([sys.executable, "-m", "equiseg_cli.main", "run", *images, "-o", str(tmp_path / "out"),
                             *FAST], stderr=slave, stdout=subprocess.DEVNULL, env=_env(), cwd=tmp_path)
    os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    assert proc.wait(timeout=300) in (0, 1)
    rows = screen(data.decode("utf-8", "replace"))
    summary = [row for row in rows if "slide(s) done" in row]
    assert len(summary) == 1 and re.fullmatch(r"\d+ slide\(s\) done, .*", summary[0]), rows
    assert not any(re.search(r"tiles?:", row) for row in rows), rows


def test_debug_and_verbose_are_accepted_after_the_command_name(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = str(tmp_path / "missing.svs")
    plain = runner.invoke(cli, ["run", missing, "-o", str(tmp_path / "o")])
    assert plain.exit_code == 1 and "Error:" in plain.output and plain.exception is not None
    assert isinstance(plain.exception, SystemExit)  # one line, no traceback
    debug = runner.invoke(cli, ["run", "--debug", missing, "-o", str(tmp_path / "o")])
    assert debug.exit_code == 1 and not isinstance(debug.exception, SystemExit)  # the exception itself
    assert "no such file" in str(debug.exception)
    before = logging.getLogger().level
    try:
        res = runner.invoke(cli, ["info", "-v", str(REPO / "sample_data" / "CMU-1-Small-Region.svs")])
        assert res.exit_code == 0, res.output
        assert logging.getLogger().level == logging.INFO
        res = runner.invoke(cli, ["-v", "info", "-v", str(REPO / "sample_data" / "CMU-1-Small-Region.svs")])
        assert res.exit_code == 0 and logging.getLogger().level == logging.DEBUG  # counts add up
    finally:
        logging.getLogger().setLevel(before)
    helped = runner.invoke(cli, ["run", "--help"])
    assert "--debug" in helped.output and "--verbose" in helped.output


def test_workers_without_dask_say_which_pip_install_fixes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = (REPO / "pyproject.toml").read_text()  # tomllib is Python >= 3.11; the project supports 3.10
    name = re.search(r'^name = "([^"]+)"', toml, re.M)
    assert name is not None and re.search(r"^distributed = \[", toml, re.M), "no 'distributed' extra"
    fix = f"pip install '{name.group(1)}[distributed]'"
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now raises ImportError
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    for flag in (["--workers", "2"], ["--scheduler", "tcp://127.0.0.1:8786"]):
        # the input does not exist: the missing extra is reported first, before any slide or model is touched
        res = CliRunner().invoke(cli, ["run", str(tmp_path / "none.svs"), "-o", str(tmp_path / "o"), *flag])
        assert res.exit_code != 0
        assert fix in res.output and "no such file" not in res.output, res.output


def test_commands_that_learn_their_regions_one_by_one_log_a_line_per_region(capsys: pytest.CaptureFixture[str]) -> None:
    from equiseg_cli.options import progress_bars

    on_region, on_units, close = progress_bars(False, "robustness", "core", "segmentations", "seg")
    on_region("slide1/A-1")
    on_units(3, 24, "segmentations")
    on_region("slide1/A-2")
    close()
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(rf"{CLOCK} working on cores; a line per started core .*", err[0]), err
    assert re.fullmatch(rf"{CLOCK} core 1 slide1/A-1: started \(0 finished\)", err[1]), err
    assert re.fullmatch(rf"{CLOCK} core 2 slide1/A-2: started \(1 finished\)", err[2]), err


def test_pretrain_logs_a_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    from PIL import Image

    from equiseg_wsi.slide import open_slide

    with open_slide(REPO / "sample_data" / "CMU-1-Small-Region.svs") as s:
        crop = tmp_path / "crop.png"
        Image.fromarray(s.read_region(700, 700, 400, 400, s.mpp)).save(crop)
    res = CliRunner().invoke(cli, ["pretrain", "--mode", "ssl", str(crop), "--mpp", "0.499", "-o", str(tmp_path / "o"),
                                   "--widths", "4,8,8,8", "--tile", "32", "--batch-size", "2", "--epochs", "2",
                                   "--steps-per-epoch", "2", "--device", "cpu", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert re.search(rf"^{CLOCK} 2 epoch\(s\) to process", res.output, re.M), res.output
    for epoch, step in ((1, 2), (2, 4)):
        line = rf"^{CLOCK} epoch {epoch}/2: loss \d+\.\d+, lr \S+ at step {step}$"
        assert re.search(line, res.output, re.M), res.output
