"""The in-process run fits on two regions at a time and, with their features cached, segments two slides at a
time (forked processes on Linux, threads elsewhere): the outputs (the run's KMeans model included) are
byte-identical to one at a time either way, results come back in input order, and every slide is reported once."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_sample_cores

from equiseg_wsi.inputs import collect_inputs
from equiseg_wsi.options import ExtractorSpec, RegionOptions, RunJob, RunOptions, SegmentOptions
from equiseg_wsi.runner import InProcess, run_folder

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".geojson", ".csv", ".png", ".qptma", ".npz")


def _job(clustering: str = "run") -> RunJob:
    seg = SegmentOptions(target_mpp=4.0, tile_size=128)
    return RunJob(ExtractorSpec(device="cpu", target_mpp=4.0), RunOptions(seg, RegionOptions(mpp=0.5),
                                                                          clustering=clustering))


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in SUFFIXES}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = copy_sample_cores(tmp_path_factory.mktemp("in"), 6)
    shutil.copy(REPO / "sample_data" / "CMU-1-Small-Region.svs", folder)  # a slide among cores
    return folder


def test_two_slide_threads_give_the_outputs_of_one(inputs: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import equiseg_wsi.run_model as run_model
    from equiseg_wsi import forked

    sources = collect_inputs([inputs])
    reports, order = {}, {}
    ways = [(1, False), (2, False)] + ([(2, True)] if sys.platform.startswith("linux") else [])
    for threads, processes in ways:  # one at a time; two on threads; two on forked processes
        monkeypatch.setattr(run_model, "FIT_THREADS", threads)  # the fit's regions too: one, then two at a time
        monkeypatch.setattr(forked, "USE_PROCESSES", processes)
        way = f"{'p' if processes else 't'}{threads}"
        order[way] = []
        reports[way] = run_folder(sources, tmp_path / way, _job(), executor=InProcess(threads),
                                  on_result=lambda i, _r, w=way: order[w].append(i))
    one = _outputs(tmp_path / "t1")
    assert len(one) > 3 * len(sources) and order["t1"] == list(range(len(sources)))
    for way in reports:
        assert [r.name for r in reports[way].results] == [s.name for s in sources]
        assert all(r.status == "done" for r in reports[way].results)
        assert sorted(order[way]) == list(range(len(sources)))
        assert _outputs(tmp_path / way) == one, way


def test_slides_that_compute_features_stay_one_at_a_time(inputs: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import equiseg_wsi.runner as runner

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("slides that run the network were given threads")

    monkeypatch.setattr(runner, "_map_threaded", refuse)
    sources = collect_inputs([inputs])[:3]
    report = run_folder(sources, tmp_path / "region", _job("region"), executor=InProcess(2))
    assert all(r.status == "done" for r in report.results)


@pytest.mark.parametrize("processes", [False, True] if sys.platform.startswith("linux") else [False])
def test_one_slide_of_several_regions_segments_them_two_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    processes: bool) -> None:
    """One slide leaves a slide worker idle: its regions (a TMA's cores) go to the workers instead, with the
    outputs of one at a time and no region part left behind."""
    import threading

    import equiseg_wsi.region_outputs as region_outputs
    import equiseg_wsi.runner as runner
    from equiseg_wsi import forked
    from equiseg_wsi.region_outputs import REGION_RECORDS

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(REPO / "sample_data" / "tma" / "tma_3x4.svs", folder)
    sources = collect_inputs([folder])
    one = run_folder(sources, tmp_path / "one", _job(), executor=InProcess(1))
    threads: dict[str, str] = {}  # region -> the thread that segmented it
    part = region_outputs.region_part

    def watched(*args: Any) -> Any:
        threads[args[3].name] = threading.current_thread().name
        return part(*args)

    monkeypatch.setattr(forked, "USE_PROCESSES", processes)
    if not processes:  # threads: the calls are seen here
        for module in (runner, region_outputs):
            monkeypatch.setattr(module, "region_part", watched, raising=False)
    two = run_folder(sources, tmp_path / "two", _job(), executor=InProcess(2))
    assert [r.status for r in two.results] == [r.status for r in one.results] == ["done"]
    cores = [r["region"] for r in one.results[0].regions if r["present"] in (True, "True")]
    assert len(cores) >= 4
    if not processes:
        assert sorted(threads) == sorted(cores)
        assert threading.main_thread().name not in threads.values()
    assert len(_outputs(tmp_path / "one")) > len(cores) and _outputs(tmp_path / "two") == _outputs(tmp_path / "one")
    assert not (tmp_path / "two" / sources[0].name / REGION_RECORDS).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers are Linux only")
def test_a_worker_killed_on_a_region_fails_its_slide_in_one_line(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The out-of-memory killer taking a worker while it segments a core: the slide fails with the cause (the
    next run redoes it), the run ends, nothing hangs."""
    import os
    import time

    import equiseg_wsi.runner as runner

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(REPO / "sample_data" / "tma" / "tma_3x4.svs", folder)
    sources = collect_inputs([folder])
    task = runner.region_task

    def killed_on_b2(*args: Any) -> None:
        if args[4] == "B-2":
            os._exit(137)
        task(*args)

    monkeypatch.setattr(runner, "region_task", killed_on_b2)
    start = time.perf_counter()
    report = run_folder(sources, tmp_path / "out", _job(), executor=InProcess(2))
    assert time.perf_counter() - start < 120
    (result,) = report.results
    assert result.status == "failed" and "worker process died" in (result.error or "")
    assert "\n" not in (result.error or "")
    monkeypatch.setattr(runner, "region_task", task)
    again = run_folder(sources, tmp_path / "out", _job(), executor=InProcess(2))
    assert [r.status for r in again.results] == ["done"]


def test_a_last_slide_of_several_regions_spreads_them_after_the_others(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Cores first, a TMA last: the cores go two at a time, then the TMA's cores are spread over both workers
    (not one worker segmenting the whole TMA while the other waits); outputs and result order as one at a time."""
    import threading

    import equiseg_wsi.region_outputs as region_outputs
    import equiseg_wsi.runner as runner
    from equiseg_wsi import forked

    folder = copy_sample_cores(tmp_path / "in", 2)
    shutil.copy(REPO / "sample_data" / "tma" / "tma_3x4.svs", folder)
    sources = sorted(collect_inputs([folder]), key=lambda s: s.name.startswith("tma"))  # the TMA last
    one = run_folder(sources, tmp_path / "one", _job(), executor=InProcess(1))
    where: dict[str, set[str]] = {}  # slide -> the threads that segmented its regions
    part = region_outputs.region_part

    def watched(*args: Any) -> Any:
        where.setdefault(args[1].name, set()).add(threading.current_thread().name)
        return part(*args)

    monkeypatch.setattr(forked, "USE_PROCESSES", False)
    for module in (runner, region_outputs):
        monkeypatch.setattr(module, "region_part", watched, raising=False)
    order: list[int] = []
    two = run_folder(sources, tmp_path / "two", _job(), executor=InProcess(2), on_result=lambda i, _r: order.append(i))
    assert [r.name for r in two.results] == [s.name for s in sources] and sorted(order) == [0, 1, 2]
    assert all(r.status == "done" for r in one.results + two.results)
    assert len(where[sources[-1].name]) == 2  # the TMA's cores on both workers
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one")


def test_a_broken_last_slide_fails_alone_when_its_regions_are_looked_for(tmp_path: Path) -> None:
    """Whether the last slide has several regions is asked before the slides run: a file that cannot be read
    (the fit failed it already) must fail by itself, the others done."""
    folder = copy_sample_cores(tmp_path / "in", 2)
    data = (REPO / "sample_data" / "tma" / "tma_3x4.svs").read_bytes()
    (folder / "zz_broken.svs").write_bytes(data[: len(data) // 3])  # truncated: sorts last
    sources = collect_inputs([folder])
    assert sources[-1].name == "zz_broken"
    report = run_folder(sources, tmp_path / "out", _job(), executor=InProcess(2))
    assert [r.status for r in report.results] == ["done", "done", "failed"]
    assert "zz_broken" in (report.results[-1].error or "")
