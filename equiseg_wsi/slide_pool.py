"""Slides segmented at once by an in-process run: on forked worker processes where Linux forks, else on threads.

Why: once the run-wide fit has cached every slide's features, what is left of a slide (refinement, polygons,
GeoJSON, pictures, the report's figures) holds the GIL much of the time; see `forked` for the workers (warm,
stop signals left to the parent). A worker that dies (the OOM killer) fails the slides it was running, not the
run. Progress inside a slide (tiles, which only a slide without cached features reports) is not relayed from a
worker; the slides' own progress (`on_start`, `on_result`) comes from this process as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from equiseg_wsi import forked
from equiseg_wsi.errors import OutputWriteError
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import RunJob
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.slide_result import SlideResult

__all__ = ["map_at_once"]

ProcessSlide = Callable[..., SlideResult]  # `runner.process_slide(source, out_dir, job, progress=...)`


class _Workers:
    """A pool of `n` workers that replaces itself when a worker dies (the futures it held fail, later ones run)."""

    def __init__(self, n: int, processes: bool) -> None:
        self.n, self.processes = n, processes
        self._pool = self._new()

    def _new(self) -> Executor:
        if self.processes:
            return forked.process_pool(self.n)
        return ThreadPoolExecutor(self.n, thread_name_prefix="equiseg-slide")

    def submit(self, fn: Callable[..., SlideResult], *args: Any, **kwargs: Any) -> Future[SlideResult]:
        try:
            return self._pool.submit(fn, *args, **kwargs)
        except BrokenProcessPool:
            forked.end_workers(self._pool)
            self._pool.shutdown(wait=True)
            self._pool = self._new()
            return self._pool.submit(fn, *args, **kwargs)

    def result(self, future: Future[SlideResult], source: SlideSource) -> SlideResult:
        """The slide's result; a worker process that died fails the slide with the reason, not the run (and
        ends the pool's other workers: their slides fail with it, later slides get a new pool)."""
        try:
            return future.result()
        except BrokenProcessPool:
            forked.end_workers(self._pool)
            return SlideResult(name=source.name, path=str(source.path), status="failed",
                               error=f"{source.path}: the worker process segmenting it died (out of memory?); the "
                                     "next run redoes it")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def map_at_once(
    process: ProcessSlide, job: RunJob, sources: Sequence[SlideSource], out_dir: Path, workers: int,
    on_start: Callable[[int, SlideSource], None] | None, on_result: Callable[[int, SlideResult], None] | None,
    progress: ProgressCallback = no_progress, processes: bool | None = None,
) -> list[SlideResult]:
    """`process` on every slide, `workers` at a time (started in input order) on forked processes or threads
    (`processes`; default: where `forked.USE_PROCESSES`); results in input order. On Ctrl-C,
    a stop signal or a full disk no new slide starts and the running ones are waited for (and recorded) before
    the error goes on: one finishing after the manifest was written would contradict it."""
    results: list[SlideResult | None] = [None] * len(sources)
    running: dict[Future[SlideResult], int] = {}
    pool = _Workers(workers, forked.USE_PROCESSES if processes is None else processes)

    def collect(future: Future[SlideResult]) -> None:
        i = running.pop(future)
        try:
            results[i] = pool.result(future, sources[i])
        except OutputWriteError as exc:
            if exc.result is None:
                raise
            results[i] = exc.result
            if on_result is not None:
                on_result(i, exc.result)
            raise
        if on_result is not None:
            on_result(i, results[i])  # type: ignore[arg-type]

    try:
        for i, source in enumerate(sources):
            while len(running) >= workers:
                for future in wait(running, return_when=FIRST_COMPLETED).done:
                    collect(future)
            if on_start is not None:
                on_start(i, source)
            inside = no_progress if pool.processes else progress  # a callback does not cross into a worker
            running[pool.submit(process, source, out_dir, job, progress=inside)] = i
        while running:
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                collect(future)
    except BaseException:
        for future in wait(running).done:
            with contextlib.suppress(BaseException):
                collect(future)
        raise
    finally:
        pool.shutdown()
    return [r for r in results if r is not None]
