"""Forked worker processes (`forked`): results in input order from a closure, errors raised as they were raised,
a dead worker a clear error, callbacks relayed to this process; and the run-wide fit on them gives the model and
the progress of the fit on threads."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_sample_cores

from equiseg_wsi import forked
from equiseg_wsi.inputs import collect_inputs
from equiseg_wsi.options import ExtractorSpec, RegionOptions, RunJob, RunOptions, SegmentOptions
from equiseg_wsi.run_model import fit_regions
from equiseg_wsi.segment import FeatureCache

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")


@linux_only
def test_a_closure_runs_on_other_processes_in_input_order() -> None:
    offset = 100  # captured, not pickled: the workers are forks

    def work(i: int) -> tuple[int, int]:
        return i + offset, os.getpid()

    out = list(forked.forked_map(work, range(7), 2))
    assert [v for v, _ in out] == list(range(100, 107))
    assert os.getpid() not in {pid for _, pid in out}


@linux_only
def test_an_error_in_the_work_is_raised_here() -> None:
    def work(i: int) -> int:
        if i == 3:
            raise ValueError("bad input 3")
        return i

    with pytest.raises(ValueError, match="bad input 3"):
        list(forked.forked_map(work, range(6), 2))


@linux_only
def test_a_dead_worker_is_a_clear_error() -> None:
    def work(i: int) -> int:
        if i == 2:
            os._exit(9)
        return i

    with pytest.raises(forked.WorkerDiedError, match="worker process died"):
        list(forked.forked_map(work, range(5), 2))


@linux_only
def test_a_dead_worker_does_not_wait_for_the_other_one() -> None:
    """The other worker ignores SIGTERM, which the executor sends when its pool breaks: it is killed instead
    (before the fix the run hung until the timeout)."""
    def work(i: int) -> int:
        if i == 1:
            os._exit(9)
        time.sleep(60)  # a long input beside the one that dies
        return i

    start = time.perf_counter()
    with pytest.raises(forked.WorkerDiedError):
        list(forked.forked_map(work, range(4), 2))
    assert time.perf_counter() - start < 20


@linux_only
def test_callbacks_made_in_workers_are_called_here_on_one_thread() -> None:
    seen: list[tuple[int, str, str]] = []

    def note(i: int, what: str) -> None:
        seen.append((i, what, threading.current_thread().name))

    with forked.Relay() as relay:
        relayed = relay.wrap(note)
        assert relayed is not None and relay.wrap(None) is None

        def work(i: int) -> int:
            relayed(i, f"pid {os.getpid()}")
            return i

        assert list(forked.forked_map(work, range(6), 2)) == list(range(6))
    assert sorted(i for i, _, _ in seen) == list(range(6))
    assert {name for _, _, name in seen} == {"equiseg-relay"}
    assert all(what != f"pid {os.getpid()}" for _, what, _ in seen)


@linux_only
def test_the_fit_on_processes_gives_the_model_and_progress_of_threads(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sources = collect_inputs([copy_sample_cores(tmp_path / "in", 4)])
    seg = SegmentOptions(target_mpp=4.0, tile_size=128)
    job = RunJob(ExtractorSpec(device="cpu", target_mpp=4.0), RunOptions(seg, RegionOptions(mpp=0.5)))
    fits, events = {}, {}
    for processes in (False, True):
        monkeypatch.setattr(forked, "USE_PROCESSES", processes)
        regions: list[str] = []
        tiles: list[tuple[int, int, str]] = []
        model, failures = fit_regions(sources, job, cache=FeatureCache(tmp_path / f"cache{processes}"),
                                      on_region=regions.append, progress=lambda *a, t=tiles: t.append(a))
        assert not failures.items
        fits[processes], events[processes] = model, (sorted(regions), sorted(tiles))
        assert sorted(p.name for p in (tmp_path / f"cache{processes}").glob("*.npz"))  # every region cached
    assert np.array_equal(fits[True].centroids, fits[False].centroids)
    assert events[True] == events[False] and len(events[True][0]) == len(sources) and events[True][1]


@linux_only
def test_only_a_cpu_network_goes_to_forked_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert forked.use_processes(torch.device("cpu")) and forked.use_processes("cpu")
    for device in ("cuda", "cuda:1", "mps", torch.device("cuda", 0)):  # a fork cannot use the parent's GPU context
        assert not forked.use_processes(device)
    monkeypatch.setattr(forked, "USE_PROCESSES", False)
    assert not forked.use_processes("cpu")


@linux_only
def test_mkl_buffers_are_released_and_workers_forked_after_threads_agree_with_them() -> None:
    """MKL's buffers are released before each fork (a worker once spun forever in MKL's allocator after this
    process had run the network on two threads: bench_cohort, not reproduced at this size); the features agree."""
    import torch

    from equiseg_wsi.features import build_extractor
    from equiseg_wsi.run_model import _one_torch_thread
    from equiseg_wsi.threads import ordered_map

    if torch.backends.mkl.is_available():
        assert forked.release_mkl_buffers()
    extractor = build_extractor(ExtractorSpec(device="cpu", batch_size=1, target_mpp=4.0))
    tiles = [np.random.default_rng(i).integers(0, 256, (1, 96, 96, 3), dtype=np.uint8) for i in range(4)]
    here = list(ordered_map(lambda t: extractor.extract(t, halo=0), tiles, 2, initializer=_one_torch_thread))
    there = list(forked.forked_map(lambda t: extractor.extract(t, halo=0), tiles, 2, initializer=_one_torch_thread))
    for a, b in zip(here, there, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
