"""Many slides on a Dask cluster: one task per slide (and per region of a slide of several), workers keep the
model loaded, results stay small.

Workers write each slide's files to the output folder themselves (shared storage on a real cluster) and
return only the `SlideResult`; the caller writes the run manifest. With a local cluster the same machine's
cores are split between worker processes. The run-wide KMeans fit before the slides sends every region of
several tiles to the workers `TILES_PER_TASK` tiles at a time, so one large slide uses every worker.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equiseg_wsi.errors import InputError, OutputWriteError
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import RunJob
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.regions import SlideRegions
from equiseg_wsi.runner import process_slide, region_task
from equiseg_wsi.slide_result import SlideResult
from equiseg_wsi.threads import in_order
from equiseg_wsi.tile_features import GroupMapper, TileBatch, TileGroup, group_features

__all__ = ["DaskExecutor"]


def slide_task(source: SlideSource, out_dir: str, job: RunJob) -> SlideResult:
    """What a worker runs for one slide; the extractor and cluster model are loaded once per worker process.

    The regions of a slide of several (its tissue pieces, a TMA's cores) are tasks of their own, so one large
    slide's segmentation uses every worker too; not on GPU workers, where the slide's task holds the GPU."""
    elsewhere = None if job.spec.device.startswith("cuda") else functools.partial(_region_tasks, source, out_dir, job)
    return process_slide(source, Path(out_dir), job, elsewhere=elsewhere)


def _region_tasks(source: SlideSource, out_dir: str, job: RunJob, found: SlideRegions, regions: list[str],
                  run_key: dict[str, str]) -> None:
    """`region_task` of each region on the cluster, from inside a slide's task (which leaves its worker thread
    to them while it waits); a region task's failure other than the region's own (recorded in its part) fails
    the slide."""
    from dask.distributed import worker_client

    run = uuid.uuid4().hex  # as the slides' keys: unique on the scheduler, whatever other runs share it
    with worker_client() as client:
        [shared] = client.scatter([found])  # sent once, not with every region (a TMA's tissue map)
        client.gather([client.submit(region_task, source, out_dir, job, shared, region, run_key, pure=False,
                                     key=f"equiseg-region-{source.name}-{region}-{run}") for region in regions])


@dataclass
class DaskExecutor:
    """Slides as tasks on the scheduler at `scheduler` (tcp://host:port), or on a local cluster of `n_workers`.

    Results come back in input order whatever order the workers finish in. A worker that dies on a slide
    (killed, out of memory) fails that slide only; a full or read-only output folder (`OutputWriteError`) and
    Ctrl-C stop the run (leaving the client's context cancels the tasks not yet finished). Tasks ask for one
    `GPU` resource when the device is CUDA, so start GPU workers with `--resources GPU=1` (one per GPU).
    """

    scheduler: str | None = None
    n_workers: int | None = None
    _client: Any = field(default=None, init=False, repr=False, compare=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[GroupMapper | None]:
        """The cluster (started here unless `scheduler` names one) and a client, for the whole run."""
        if self._client is not None:  # already inside a session
            yield self._map_groups
            return
        try:
            import dask
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:
            raise InputError("distributed runs need Dask: pip install 'equiseg-wsi[distributed]'") from exc
        cluster = None
        if self.scheduler is None:
            workers = max(1, self.n_workers or 1)
            threads = max(1, (os.cpu_count() or 1) // workers)
            # torch reads OMP_NUM_THREADS at import: give each worker process its share of the cores. Dask's
            # MALLOC_TRIM_THRESHOLD_ (64 KiB) is left unset: it turns off glibc's adaptive mmap threshold, so
            # every large NumPy temporary is mapped afresh and faulted in (the refinement ran 2.4x slower)
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None,
                                       env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        try:
            with Client(self.scheduler if self.scheduler is not None else cluster) as client:
                self._client = client
                try:
                    yield self._map_groups
                finally:
                    self._client = None
        finally:
            if cluster is not None:
                cluster.close()

    def _map_groups(self, groups: Sequence[TileGroup]) -> Iterator[list[TileBatch]]:
        """`group_features` of each group on the workers, in order; at most 4 tasks per worker wait at a time,
        so results are never all held at once."""
        client = self._client
        resources = {"GPU": 1} if groups and groups[0].spec.device.startswith("cuda") else None
        window = 4 * max(1, len(client.scheduler_info().get("workers", {})))
        yield from in_order(lambda group: client.submit(group_features, group, pure=False, resources=resources),
                            groups, window)

    def map_slides(
        self, job: RunJob, sources: Sequence[SlideSource], out_dir: Path, *,
        on_start: Callable[[int, SlideSource], None] | None = None,
        on_result: Callable[[int, SlideResult], None] | None = None,
        progress: ProgressCallback = no_progress,
    ) -> list[SlideResult]:
        """`on_start` and `progress` are not called: workers do not report back until a slide is done."""
        with self.session():
            from dask.distributed import as_completed

            client = self._client
            resources = {"GPU": 1} if job.spec.device.startswith("cuda") else None
            run = uuid.uuid4().hex  # keys name tasks on the whole scheduler: another run's slide is another task
            futures = {
                client.submit(slide_task, source, str(out_dir), job, key=f"equiseg-slide-{i}-{source.name}-{run}",
                              pure=False, resources=resources): i
                for i, source in enumerate(sources)
            }
            results: list[SlideResult | None] = [None] * len(sources)
            for future in as_completed(futures):
                i = futures[future]
                try:
                    result = future.result()
                except OutputWriteError:  # the output folder is full or read-only: the run stops
                    raise
                except Exception as exc:  # the worker itself failed (killed, lost): this slide only
                    source = sources[i]
                    result = SlideResult(name=source.name, path=str(source.path), status="failed",
                                         error=f"{source.path}: worker failed: {exc.__class__.__name__}: {exc}")
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
        return [r for r in results if r is not None]
