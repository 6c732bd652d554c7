"""CSV inputs (manifests, folders' manifest.csv, --case-ids) are untrusted: a device, a FIFO or a huge file gets a
one-line InputError naming it, never a hang or a MemoryError."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli
from equiseg_wsi import inputs
from equiseg_wsi.errors import InputError, one_line
from equiseg_wsi.inputs import collect_inputs, mpp_by_file, read_case_ids, read_manifest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"
FAST = ["--target-mpp", "4", "--tile-size", "128", "--device", "cpu", "--quiet", "--mpp", "0.5"]
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    """A read that blocks (a FIFO opened without a writer) fails the test after 20 s instead of hanging it."""
    def fail(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("blocked reading a CSV input")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _zero_link(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def _assert_refused(exc: pytest.ExceptionInfo[InputError], path: Path, words: str) -> None:
    message = str(exc.value)
    assert str(path) in message and words in message
    assert one_line(exc.value) == message  # already one line


@pytest.mark.parametrize("reader", [read_manifest, mpp_by_file, read_case_ids])
def test_symlink_to_dev_zero_is_refused(tmp_path: Path, reader: Callable[[Path], object]) -> None:
    link = _zero_link(tmp_path / "manifest.csv")
    with pytest.raises(InputError) as exc:
        reader(link)
    _assert_refused(exc, link, "not a regular file (a character device)")


@needs_fifo
@pytest.mark.parametrize("reader", [read_manifest, read_case_ids])
def test_fifo_is_refused_without_blocking(tmp_path: Path, reader: Callable[[Path], object]) -> None:
    fifo = tmp_path / "ids.csv"
    os.mkfifo(fifo)
    with pytest.raises(InputError) as exc:
        reader(fifo)
    _assert_refused(exc, fifo, "not a regular file (a FIFO)")


def test_folder_manifest_that_is_not_a_file_is_refused_not_skipped(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (200, 120, 160)).save(tmp_path / "core.png")
    link = _zero_link(tmp_path / "manifest.csv")
    with pytest.raises(InputError) as exc:
        collect_inputs([tmp_path])
    _assert_refused(exc, link, "not a regular file")


def test_directory_named_csv_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ids.csv"
    folder.mkdir()
    with pytest.raises(InputError) as exc:
        read_case_ids(folder)
    _assert_refused(exc, folder, "not a regular file (a directory)")


def test_oversize_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "MAX_CSV_BYTES", 1000, raising=False)
    big = tmp_path / "big.csv"
    big.write_text("path\n" + "".join(f"slide{i:04d}.svs\n" for i in range(200)))
    for reader in (read_manifest, read_case_ids):
        with pytest.raises(InputError) as exc:
            reader(big)
        _assert_refused(exc, big, "larger than")
    small = tmp_path / "small.csv"
    small.write_text("path,mpp\na.svs,0.5\n")
    assert mpp_by_file(small) == {"a.svs": 0.5}


@pytest.mark.parametrize("length", [70_000, 200_000])  # below and above the csv module's own 128 KiB limit
def test_long_field_is_refused(tmp_path: Path, length: int) -> None:
    manifest = tmp_path / "long.csv"
    manifest.write_text("path,mpp\na.svs,0.5\n" + "b" * length + ".svs,0.5\n")
    with pytest.raises(InputError) as exc:
        read_manifest(manifest)
    _assert_refused(exc, manifest, "line 3: a field is longer than 64 KiB")
    ids = tmp_path / "ids.csv"
    ids.write_text("core,case id\nA-1," + "x" * length + "\n")
    with pytest.raises(InputError) as exc:
        read_case_ids(ids)
    _assert_refused(exc, ids, "line 2: a field is longer than 64 KiB")


def test_cli_refuses_dev_zero_case_ids_and_fifo_manifest(tmp_path: Path) -> None:
    link = _zero_link(tmp_path / "ids.csv")
    result = CliRunner().invoke(cli, ["run", str(SAMPLE), "-o", str(tmp_path / "o1"), "--case-ids", str(link), *FAST])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert errors == [f"Error: {link}: case ids file is not a regular file (a character device)"]
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "slides.csv"
        os.mkfifo(fifo)
        result = CliRunner().invoke(cli, ["run", str(fifo), "-o", str(tmp_path / "o2"), *FAST])
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 1
        assert errors == [f"Error: {fifo}: manifest is not a regular file (a FIFO)"]
