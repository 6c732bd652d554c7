"""A distributed run segments each region of a slide of several as a task of its own (so one large slide uses
every worker), with the outputs of the in-process run, the regions' stage seconds in the slide's record, and
nothing left of the regions' parts once the slide is complete; slides of one region stay one task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_sample_cores

from equiseg_wsi.inputs import collect_inputs
from equiseg_wsi.options import ExtractorSpec, RegionOptions, RunJob, RunOptions, SegmentOptions
from equiseg_wsi.region_outputs import REGION_RECORDS
from equiseg_wsi.runner import InProcess, run_folder

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".geojson", ".csv", ".png", ".qptma", ".npz")


def _job(clustering: str) -> RunJob:
    seg = SegmentOptions(target_mpp=4.0, tile_size=128)
    return RunJob(ExtractorSpec(device="cpu", target_mpp=4.0), RunOptions(seg, RegionOptions(mpp=0.5),
                                                                          clustering=clustering))


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in SUFFIXES}


@pytest.mark.parametrize("clustering", ["run", "region"])
def test_regions_run_as_tasks_with_the_outputs_of_this_process(tmp_path: Path, clustering: str) -> None:
    distributed = pytest.importorskip("distributed")
    from equiseg_wsi.distributed import DaskExecutor

    folder = copy_sample_cores(tmp_path / "in", 2)
    shutil.copy(REPO / "sample_data" / "tma" / "tma_3x4.svs", folder)  # a TMA: one region per core
    sources = collect_inputs([folder])
    local = run_folder(sources, tmp_path / "local", _job(clustering), executor=InProcess(1))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env={"OMP_NUM_THREADS": "1"}) as cluster:
        remote = run_folder(sources, tmp_path / "dask", _job(clustering),
                            executor=DaskExecutor(scheduler=cluster.scheduler_address))
        done = {name: prefix.state_counts["forgotten"] for name, prefix in cluster.scheduler.task_prefixes.items()}
    assert [r.status for r in remote.results] == ["done"] * len(sources)
    svs = next(r for r in remote.results if r.name.startswith("tma_3x4"))
    rows = json.loads((tmp_path / "dask" / svs.name / "slide.json").read_text())["regions"]
    cores = sum(1 for r in rows if r["present"] in (True, "True"))  # grid positions without a core have rows too
    assert 4 <= cores < len(rows) == len(next(r for r in local.results if r.name == svs.name).regions)
    assert done["equiseg-slide"] == len(sources)
    assert done["equiseg-region"] == cores  # one task per core of the TMA; the one-core images have none
    one, two = _outputs(tmp_path / "local"), _outputs(tmp_path / "dask")
    assert len(one) > 3 * len(sources) and one == two
    record = json.loads((tmp_path / "dask" / svs.name / "slide.json").read_text())
    local_record = next(r for r in local.results if r.name == svs.name)
    assert set(record["seconds"]) == set(local_record.seconds)  # the regions' stages, though timed on workers
    assert record["seconds"]["refine"] > 0 and record["seconds"]["export"] > 0
    assert not (tmp_path / "dask" / svs.name / REGION_RECORDS).exists()


def test_regions_the_workers_did_not_save_are_segmented_by_the_slide(tmp_path: Path) -> None:
    """A region task that saved nothing (its worker lost) leaves its region to the slide's own task."""
    from equiseg_wsi.runner import process_slide

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(REPO / "sample_data" / "tma" / "tma_3x4.svs", folder)
    (source,) = collect_inputs([folder])
    job = _job("region")
    asked: list[list[str]] = []
    reference = process_slide(source, tmp_path / "ref", job)
    result = process_slide(source, tmp_path / "out", job, elsewhere=lambda found, names, key: asked.append(names))
    assert result.status == reference.status == "done"
    assert len(asked) == 1 and len(asked[0]) == sum(1 for r in result.regions if r["present"] in (True, "True"))
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "ref")


def test_two_runs_at_once_on_one_scheduler_each_get_their_own_tasks(tmp_path: Path) -> None:
    """Task keys are the scheduler's identity of a task: two runs of the same inputs into different folders at
    the same time must not share one slide's or region's task (the second run would get the first one's result
    and miss its own files)."""
    import threading

    distributed = pytest.importorskip("distributed")
    from equiseg_wsi.distributed import DaskExecutor

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(REPO / "sample_data" / "tma" / "tma_3x4.svs", folder)
    sources = collect_inputs([folder])
    reports: dict[str, object] = {}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env={"OMP_NUM_THREADS": "1"}) as cluster:
        def run(name: str) -> None:
            reports[name] = run_folder(sources, tmp_path / name, _job("region"),
                                       executor=DaskExecutor(scheduler=cluster.scheduler_address))

        runs = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
        for t in runs:
            t.start()
        for t in runs:
            t.join()
    a, b = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    assert len(a) > 10 and a == b
