"""Slides segmented at once (`slide_pool.map_at_once`): on forked worker processes (Linux) that ignore stop
signals and leave them to the parent, a worker's death failing only its slide, the running slides finished and
recorded on Ctrl-C, and a full disk's error crossing from a worker with its slide's result."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from pathlib import Path

import pytest

from equiseg_wsi import forked, slide_pool
from equiseg_wsi.errors import OutputWriteError
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import ExtractorSpec, RunJob
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.slide_result import SlideResult

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes are forked on Linux only")
JOB = RunJob(ExtractorSpec(device="cpu"))


def _sources(n: int) -> list[SlideSource]:
    return [SlideSource(Path(f"/slides/s{i}.svs"), f"s{i}", f"s{i}", "", None, "", False) for i in range(n)]


def _where(source: SlideSource, out_dir: Path, job: RunJob, *, progress: ProgressCallback = no_progress
           ) -> SlideResult:
    """Which process ran the slide, and how it treats Ctrl-C, in the result's error field."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    return SlideResult(name=source.name, path=str(source.path), status="done", error=f"{os.getpid()} {ignored}")


def _dies_on_s1(source: SlideSource, out_dir: Path, job: RunJob, *, progress: ProgressCallback = no_progress
                ) -> SlideResult:
    if source.name == "s1":
        os._exit(3)  # as the OOM killer would end it: no exception, no cleanup
    time.sleep(0.2)
    return SlideResult(name=source.name, path=str(source.path), status="done")


def _dies_on_s1_beside_a_long_one(source: SlideSource, out_dir: Path, job: RunJob, *,
                                  progress: ProgressCallback = no_progress) -> SlideResult:
    if source.name == "s1":
        time.sleep(0.3)
        os._exit(3)
    if source.name == "s0":
        time.sleep(60)  # still running when s1's worker dies: it fails with it, at once
    return SlideResult(name=source.name, path=str(source.path), status="done")


def _slow(source: SlideSource, out_dir: Path, job: RunJob, *, progress: ProgressCallback = no_progress
          ) -> SlideResult:
    time.sleep(0.5)
    return SlideResult(name=source.name, path=str(source.path), status="done")


def _disk_full_on_s2(source: SlideSource, out_dir: Path, job: RunJob, *, progress: ProgressCallback = no_progress
                     ) -> SlideResult:
    if source.name == "s2":
        result = SlideResult(name=source.name, path=str(source.path), status="failed", error="disk full")
        raise OutputWriteError("out: no space left on device", result)
    time.sleep(0.3)  # s2 fails while s3 still runs: no slide after it is started
    return SlideResult(name=source.name, path=str(source.path), status="done")


@linux
def test_slides_run_on_forked_workers_that_leave_ctrl_c_to_the_parent(tmp_path: Path) -> None:
    results = slide_pool.map_at_once(_where, JOB, _sources(5), tmp_path, 2, None, None)
    assert [r.name for r in results] == [f"s{i}" for i in range(5)]
    pids = {int(r.error.split()[0]) for r in results if r.error}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert all(r.error and r.error.endswith("True") for r in results)


def test_threads_where_processes_are_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forked, "USE_PROCESSES", False)
    results = slide_pool.map_at_once(_where, JOB, _sources(3), tmp_path, 2, None, None)
    assert {int(r.error.split()[0]) for r in results if r.error} == {os.getpid()}


@linux
def test_a_dead_worker_fails_its_slide_and_the_run_goes_on(tmp_path: Path) -> None:
    results = slide_pool.map_at_once(_dies_on_s1, JOB, _sources(5), tmp_path, 2, None, None)
    by_name = {r.name: r for r in results}
    assert len(results) == 5 and by_name["s1"].status == "failed"
    assert "worker process" in (by_name["s1"].error or "") and "died" in (by_name["s1"].error or "")
    # the slide running beside it when the pool broke may fail with it; every slide started later is done
    assert all(by_name[f"s{i}"].status == "done" for i in (3, 4))


@linux
def test_a_dead_worker_does_not_wait_for_the_slide_beside_it(tmp_path: Path) -> None:
    start = time.perf_counter()
    results = slide_pool.map_at_once(_dies_on_s1_beside_a_long_one, JOB, _sources(4), tmp_path, 2, None, None)
    assert time.perf_counter() - start < 20
    assert [r.status for r in results] == ["failed", "failed", "done", "done"]
    assert all("worker process" in (r.error or "") for r in results[:2])


@pytest.mark.parametrize("processes", [pytest.param(True, marks=linux), False])
def test_on_ctrl_c_the_running_slides_finish_and_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               processes: bool) -> None:
    monkeypatch.setattr(forked, "USE_PROCESSES", processes)
    started, finished = [], []

    def on_start(i: int, source: SlideSource) -> None:
        if i == 2:  # Ctrl-C arrives while s0 and s1 run
            raise KeyboardInterrupt
        started.append(i)

    with pytest.raises(KeyboardInterrupt):
        slide_pool.map_at_once(_slow, JOB, _sources(5), tmp_path, 2, on_start, lambda i, r: finished.append(i))
    assert started == [0, 1] and sorted(finished) == [0, 1]


@pytest.mark.parametrize("processes", [pytest.param(True, marks=linux), False])
def test_a_full_disk_stops_with_the_slide_it_was_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         processes: bool) -> None:
    monkeypatch.setattr(forked, "USE_PROCESSES", processes)
    finished: dict[int, SlideResult] = {}
    with pytest.raises(OutputWriteError) as caught:
        slide_pool.map_at_once(_disk_full_on_s2, JOB, _sources(5), tmp_path, 2, None,
                               lambda i, r: finished.__setitem__(i, r))
    assert caught.value.result is not None and caught.value.result.error == "disk full"
    assert finished[2].status == "failed" and 4 not in finished


def test_output_write_error_keeps_its_result_through_pickle() -> None:
    result = SlideResult(name="s", path="/s.svs", status="failed", error="disk full")
    back = pickle.loads(pickle.dumps(OutputWriteError("out: no space left", result)))
    assert str(back) == "out: no space left" and back.result == result
