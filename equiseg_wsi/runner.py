"""One slide end to end, and many slides one after another, with a manifest that makes runs resumable.

A slide's outputs live in `OUT/<slide>/`; `OUT/<slide>/slide.json` is written last, so its presence means the
slide is complete (every other file is written atomically before it) for the options, model and input in its
run key (`equiseg_wsi.run_key`): a resumed run skips it only when they are unchanged, and redoes it otherwise.
The run-level `manifest.json` and `biomarkers.csv` are rebuilt from those records at the end of every run.

`run_folder` is a whole run on one output folder: it holds the folder's lock (one run at a time,
`equiseg_wsi.run_lock`), gives each slide its stable folder name (`equiseg_wsi.output_names`), removes what a
killed run left (temporaries, scratch: `equiseg_wsi.scratch`), and stops early, recording what completed,
on Ctrl-C or a stop signal (`equiseg_wsi.stop_signals`) and when the output folder takes no more writes
(full disk, quota, read-only): the slides after that would only fail the same way.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from equiseg_wsi.biomarkers import write_csv
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.decoded_store import keep_decoded
from equiseg_wsi.errors import EquisegError, InputError, NoTissueError, OutputWriteError, one_line
from equiseg_wsi.export.atomic import atomic_write_text, remove_stale_temporaries
from equiseg_wsi.export.geojson import write_geojson
from equiseg_wsi.export.tma_outputs import export_dearray, with_missing_cores
from equiseg_wsi.features import build_extractor
from equiseg_wsi.forked import forked_map, use_processes
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import RunJob, RunOptions
from equiseg_wsi.output_names import stable_names
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.region_outputs import (
    REGION_RECORDS,
    RegionMapper,
    region_identity,
    region_part,
    save_region_part,
    segment_regions,
)
from equiseg_wsi.regions import SlideRegions, open_regions
from equiseg_wsi.run_files import check_writable, write_run_outputs
from equiseg_wsi.run_key import changed_parts, run_key
from equiseg_wsi.run_lock import output_lock
from equiseg_wsi.run_model import FEATURE_CACHE, discard_feature_cache, fit_regions, prepare_run
from equiseg_wsi.scratch import remove_stale_scratch, scratch_area
from equiseg_wsi.segment import FeatureCache
from equiseg_wsi.slide import open_slide
from equiseg_wsi.slide_pool import map_at_once
from equiseg_wsi.slide_result import SlideResult
from equiseg_wsi.stop_signals import signal_name, signal_number
from equiseg_wsi.storage_errors import storage_cause, storage_error, storage_message
from equiseg_wsi.threads import ordered_map
from equiseg_wsi.tile_features import Extractor, GroupMapper

log = logging.getLogger(__name__)

SLIDE_RECORD = "slide.json"


class RunStopped(EquisegError):
    """A run stopped before every slide was tried: Ctrl-C or a stop signal (`signum`), or an `OutputWriteError`.

    `results` has one entry per slide, in input order: those not finished have the status "stopped"."""

    def __init__(self, message: str, results: list[SlideResult] | None = None, signum: int | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.results = results if results is not None else []
        self.signum = signum
        self.reason = reason or message  # what the manifest's "stopped" says: a signal's name, or the write error


def slide_dir(out_dir: Path, source: SlideSource) -> Path:
    return out_dir / source.name


def load_record(out_dir: Path, source: SlideSource) -> SlideResult | None:
    """A finished slide's record, or None when the slide must be (re)done."""
    path = slide_dir(out_dir, source) / SLIDE_RECORD
    if not path.is_file():
        return None
    try:
        result = SlideResult(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if not _same_file(result.path, source.path) or not all((out_dir / p).is_file() for p in result.outputs):
        return None
    return result


def _same_file(recorded: str, path: Path) -> bool:
    """Whether a record's input path names `path` (as given then or now: relative, absolute, via a link)."""
    if recorded == str(path):
        return True
    try:
        return Path(recorded).resolve() == path.resolve()
    except (OSError, RuntimeError):
        return False


@functools.lru_cache(maxsize=4)
def _cached_cluster_model(path: str, stamp: tuple[int, int]) -> ClusterModel:
    return ClusterModel.load(path)


def load_cluster_model(path: str | None) -> ClusterModel | None:
    """A saved cohort model, loaded once per process and file version (workers reuse it for every slide)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the KMeans model ({exc.strerror or exc})") from exc
    return _cached_cluster_model(str(path), (st.st_mtime_ns, st.st_size))


def process_slide(source: SlideSource, out_dir: Path, job: RunJob, *, progress: ProgressCallback = no_progress,
                  elsewhere: RegionMapper | None = None) -> SlideResult:
    """Segment every region of one slide and write its outputs; errors become a failed result, not a raise.

    A slide complete from an earlier run with the same run key is skipped (unless `overwrite`); one made with
    other options, model or input is redone, its changed parts in `redone`. Large intermediates go to the
    output folder's scratch area. Raises `OutputWriteError` (the result attached) when the output folder takes
    no more writes: every later slide would fail the same way. `elsewhere`: see `segment_regions` (not used
    when the slide fits its own model, `--clustering slide`, which its regions would need)."""
    options = job.options
    start = time.perf_counter()
    result = SlideResult(name=source.name, path=str(source.path), status="failed")
    previous = load_record(out_dir, source)
    try:
        extractor = build_extractor(job.spec)
        result.run_key = run_key(options, extractor.feature_identity.as_dict(), job.kmeans_model, source)
        if previous is not None and not options.overwrite:
            result.redone = changed_parts(previous.run_key, result.run_key)
            if not result.redone:
                previous.status, previous.redone = "skipped", []
                return previous
        _forget_slide(out_dir, source)
        remove_stale_scratch(scratch_area(out_dir))  # a worker on another host cleans up after its own host
        model = load_cluster_model(job.kmeans_model)
        cache = FeatureCache(job.feature_cache) if job.feature_cache else None
        if model is None and options.clustering == "slide":  # one model for the slide's regions, features kept
            model, elsewhere = fit_regions([source], job, cache=cache)[0], None
        _segment_slide(source, out_dir, extractor, options, model, progress, result, cache, elsewhere)
        _remove_old_outputs(out_dir, previous, result)
        result.status = "done"
        result.seconds["total"] = round(time.perf_counter() - start, 3)
        record = slide_dir(out_dir, source) / SLIDE_RECORD
        atomic_write_text(record, json.dumps(result.as_dict(), indent=1) + "\n")  # written last; keeps column order
        shutil.rmtree(slide_dir(out_dir, source) / REGION_RECORDS, ignore_errors=True)  # the record supersedes them
        return result
    except Exception as exc:  # one bad slide must not stop a batch; the manifest carries the cause
        result.status = "failed"
        result.seconds["total"] = round(time.perf_counter() - start, 3)
        storage = storage_cause(exc, out_dir)
        if storage is not None:
            result.error = storage_message(out_dir, storage)
            raise OutputWriteError(result.error, result) from exc
        if isinstance(exc, EquisegError):
            result.error = one_line(exc)
        elif isinstance(exc, MemoryError):
            result.error = f"{source.path}: out of memory"
        else:
            log.debug("unexpected failure on %s", source.path, exc_info=True)
            result.error = f"{source.path}: {exc.__class__.__name__}: {one_line(exc)}"
        return result


def _forget_slide(out_dir: Path, source: SlideSource) -> None:
    """Before (re)doing a slide: its old record no longer vouches for its files, and a killed run's temporaries go."""
    folder = slide_dir(out_dir, source)
    (folder / SLIDE_RECORD).unlink(missing_ok=True)
    remove_stale_temporaries(folder)


def _remove_old_outputs(out_dir: Path, previous: SlideResult | None, result: SlideResult) -> None:
    """Files the earlier run of this slide wrote that the new one did not (regions that are gone)."""
    if previous is None:
        return
    folder = (out_dir / result.name).resolve()
    for name in set(previous.outputs) - set(result.outputs):
        path = (out_dir / name).resolve()
        if path.parent == folder:
            path.unlink(missing_ok=True)


def _segment_slide(
    source: SlideSource,
    out_dir: Path,
    extractor: Extractor,
    options: RunOptions,
    model: ClusterModel | None,
    progress: ProgressCallback,
    result: SlideResult,
    cache: FeatureCache | None = None,
    elsewhere: RegionMapper | None = None,
) -> None:
    t0 = time.perf_counter()
    with open_regions(source, options.regions, None if cache is None else cache.folder) as (slide, found):
        result.warnings.extend(slide.warnings)  # e.g. glass far from neutral (a colour-space problem)
        folder = slide_dir(out_dir, source)
        outputs: list[Path] = []
        if found.grid is not None:
            outputs.extend(export_dearray(found.grid, slide, folder, case_ids=options.case_ids).values())
        result.seconds["tissue"] = round(time.perf_counter() - t0, 3)
        folder.mkdir(parents=True, exist_ok=True)
        features = segment_regions(slide, source, found, folder, extractor, options, model, progress, result,
                                    scratch_area(out_dir), cache, elsewhere)
        outputs.extend(features.pictures)
        if found.grid is not None:  # every missing grid position gets a row too, with present = False
            result.regions = with_missing_cores(
                found.grid, result.regions, lambda name: region_identity(source, found, name, options))
    t1 = time.perf_counter()
    geojson = folder / f"{source.name}.geojson"
    write_geojson(geojson, features.annotations)
    table = write_csv(folder / "biomarkers.csv", result.regions)
    outputs.extend([geojson, table])
    result.seconds["export"] = round(result.seconds.get("export", 0.0) + time.perf_counter() - t1, 3)
    result.outputs = sorted(str(p.relative_to(out_dir)) for p in outputs)


class Executor(Protocol):
    """Runs `process_slide` for each source somewhere (this process, a Dask cluster); results in input order.

    `session` holds the executor's resources for a whole run and yields how the run-wide fit sends a region's
    tiles to them (`tile_features.GroupMapper`), or None to compute them in this process."""

    def session(self) -> contextlib.AbstractContextManager[GroupMapper | None]: ...

    def map_slides(
        self, job: RunJob, sources: Sequence[SlideSource], out_dir: Path, *,
        on_start: Callable[[int, SlideSource], None] | None = None,
        on_result: Callable[[int, SlideResult], None] | None = None,
        progress: ProgressCallback = no_progress,
    ) -> list[SlideResult]: ...


# Slides segmented at once in this process when their features are cached (a run-wide fit computed them): what
# is left is NumPy, shapely and PNG work, so two slides overlap on two cores (segmentation pass of 10 Gleason-size
# cores 18.3 -> 12.4 s on threads, 200 EBHI tiles 10.0 -> 5.5 s on forked processes against threads).
SLIDE_THREADS = 2


@dataclass
class InProcess:
    """The embedded default: slides in this process, the model loaded once; one after another, or `threads` at
    a time when the run-wide fit has cached every slide's features (no network work is left in the slides). A
    slide that would run alone then (the only one, or a last one of several regions) has its regions spread."""

    threads: int = SLIDE_THREADS

    @contextlib.contextmanager
    def session(self) -> Iterator[GroupMapper | None]:
        yield None

    def map_slides(
        self, job: RunJob, sources: Sequence[SlideSource], out_dir: Path, *,
        on_start: Callable[[int, SlideSource], None] | None = None,
        on_result: Callable[[int, SlideResult], None] | None = None,
        progress: ProgressCallback = no_progress,
    ) -> list[SlideResult]:
        workers = min(self.threads, os.cpu_count() or 1)
        cached = job.options.clustering == "run" and bool(job.feature_cache) and bool(job.kmeans_model)
        # Slides `workers` at a time, where there are that many. A slide alone (fewer slides than workers, or
        # the last of more, a TMA say, that would run after the others) has its regions spread instead.
        if workers <= 1 or not cached or len(sources) < workers:
            pooled = 0
        elif len(sources) > workers and _several_regions(sources[-1], job):
            pooled = len(sources) - 1
        else:
            pooled = len(sources)
        results = _map_threaded(job, sources[:pooled], out_dir, workers, on_start, on_result, progress) \
            if pooled else []
        spread = workers > 1 and cached
        for i, source in enumerate(sources[len(results):], start=len(results)):
            if on_start is not None:
                on_start(i, source)
            elsewhere = functools.partial(_regions_at_once, job, out_dir, workers, source) if spread else None
            result = process_slide(source, out_dir, job, progress=progress, elsewhere=elsewhere)
            if on_result is not None:
                on_result(i, result)
            results.append(result)
        return results


def _map_threaded(
    job: RunJob, sources: Sequence[SlideSource], out_dir: Path, threads: int,
    on_start: Callable[[int, SlideSource], None] | None, on_result: Callable[[int, SlideResult], None] | None,
    progress: ProgressCallback,
) -> list[SlideResult]:
    """`process_slide` on `threads` workers at once: forked processes on Linux for a CPU network, else threads."""
    processes = use_processes(build_extractor(job.spec).device)
    return map_at_once(process_slide, job, sources, out_dir, threads, on_start, on_result, progress, processes)


def region_task(source: SlideSource, out_dir: str, job: RunJob, found: SlideRegions, region: str,
                run_key: dict[str, str]) -> None:
    """One region of a slide segmented where it runs (a Dask worker, a forked worker): its outputs saved as its
    part in the slide's folder (`region_outputs.REGION_RECORDS`), from which `process_slide` assembles the slide."""
    out, options = Path(out_dir), job.options
    area = next(a for a in found.areas if a.name == region)
    cache = FeatureCache(job.feature_cache) if job.feature_cache else None
    with open_slide(source.path, backend=options.regions.backend, mpp=source.mpp or options.regions.mpp) as slide:
        part = region_part(slide, source, found, area, slide_dir(out, source), build_extractor(job.spec), options,
                           load_cluster_model(job.kmeans_model), no_progress, run_key, scratch_area(out), cache)
    save_region_part(slide_dir(out, source), part)


def _several_regions(source: SlideSource, job: RunJob) -> bool:
    """Whether the run-wide fit found several regions in `source` (read from its cache: no tissue search)."""
    try:
        with open_regions(source, job.options.regions, FeatureCache(job.feature_cache).folder
                          if job.feature_cache else None) as (_, found):
            return len(found.areas) > 1
    except Exception:  # whatever is wrong with it, its own turn reports it: this guess must not stop the run
        return False


def _regions_at_once(job: RunJob, out_dir: Path, workers: int, source: SlideSource, found: SlideRegions,
                     regions: list[str], run_key: dict[str, str]) -> None:
    """The in-process `RegionMapper`: `region_task` of each region, `workers` at a time (forked processes on
    Linux for a CPU network, else threads); the slide's features are cached, so no network work is left."""
    def one(region: str) -> None:
        region_task(source, str(out_dir), job, found, region, run_key)

    processes = use_processes(build_extractor(job.spec).device)
    for _ in (forked_map if processes else ordered_map)(one, regions, workers):
        pass


def run_slides(
    sources: Sequence[SlideSource],
    out_dir: Path,
    job: RunJob,
    *,
    executor: Executor | None = None,
    on_start: Callable[[int, SlideSource], None] | None = None,
    on_result: Callable[[int, SlideResult], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> list[SlideResult]:
    """Process every slide with `executor` (default: in this process) and return their results in input order.

    Raises `RunStopped`, with a result for every slide, on Ctrl-C or a stop signal (a `KeyboardInterrupt`)
    and when the output folder takes no more writes (`OutputWriteError`); the slide being processed then is
    abandoned (its files are written atomically: none is left half-written) and redone by the next run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = executor if executor is not None else InProcess()
    finished: dict[int, SlideResult] = {}

    def record(i: int, result: SlideResult) -> None:
        finished[i] = result
        if on_result is not None:
            on_result(i, result)

    try:
        return runner.map_slides(job, sources, out_dir, on_start=on_start, on_result=record, progress=progress)
    except OutputWriteError as exc:
        if exc.result is not None:
            index = next((i for i, s in enumerate(sources) if s.name == exc.result.name and i not in finished), None)
            if index is not None:
                finished[index] = exc.result
        signum, reason = None, str(exc)
        message, how = reason, f"stopped ({reason})"
    except KeyboardInterrupt as exc:
        signum = signal_number(exc)
        reason = signal_name(signum)
        message = how = f"stopped by {reason}"
    results = [finished.get(i) or SlideResult(name=s.name, path=str(s.path), status="stopped",
                                              error=f"{s.path}: not finished: the run was {how}")
               for i, s in enumerate(sources)]
    complete = sum(r.status in ("done", "skipped") for r in results)
    raise RunStopped(f"{message}; {complete} of {len(sources)} slide(s) complete", results, signum, reason)


@dataclass
class RunReport:
    """What `run_folder` did: every slide's result, the run files written, and why it stopped early, if it did."""

    results: list[SlideResult]
    manifest: Path | None  # None when it could not be written (see `error`)
    table: Path | None
    stopped: str | None = None  # a signal's name ("SIGTERM"), or the output folder's write error; None: ran to the end
    signum: int | None = None  # the signal that stopped the run
    error: str | None = None  # one line: the output folder took no more writes (the run stopped, or its files)


def run_folder(
    sources: Sequence[SlideSource],
    out_dir: Path,
    job: RunJob,
    *,
    executor: Executor | None = None,
    on_start: Callable[[int, SlideSource], None] | None = None,
    on_result: Callable[[int, SlideResult], None] | None = None,
    progress: ProgressCallback = no_progress,
    **model_extra: Any,
) -> RunReport:
    """A whole run on one output folder: lock it, name the slides, process them, write the manifest and table.

    Holds the folder's lock throughout (`OutputBusyError` at once when another run holds it), removes what a
    killed run left there, and gives each input its stable folder name. It does not raise when the run stops
    early: on Ctrl-C or a stop signal (install `stop_on_signals` for SIGTERM/SIGHUP), and when the output folder
    takes no more writes, it records what completed and returns a report whose `stopped` says why; the caller
    chooses the exit status. `error` is set when the output folder took no more writes, even for the manifest.
    """
    with output_lock(out_dir), keep_decoded(out_dir / FEATURE_CACHE):  # removed with the feature cache
        check_writable(out_dir)
        remove_stale_temporaries(out_dir)  # a killed run's half-written manifest or table; no other run is active
        remove_stale_scratch(scratch_area(out_dir))
        try:
            named = stable_names(sources, out_dir)
        except OSError as exc:
            if not storage_error(exc, out_dir):
                raise
            raise OutputWriteError(storage_message(out_dir, exc)) from exc
        report = RunReport(results=[], manifest=None, table=None)
        runner = executor if executor is not None else InProcess()
        try:
            with runner.session() as mapper:
                job, fit_seconds = _clustering_job(named, job, out_dir, progress, mapper)
                if fit_seconds:  # the run-wide fit computed every region's features before the slides: its time
                    model_extra = {**model_extra, "run_kmeans_fit_seconds": fit_seconds}
                report.results = run_slides(named, out_dir, job, executor=runner, on_start=on_start,
                                            on_result=on_result, progress=progress)
        except RunStopped as exc:
            report.results, report.stopped, report.signum = exc.results, exc.reason, exc.signum
            if exc.signum is None:
                report.error = str(exc)
        report.manifest, report.table, error = _write_run_files(out_dir, report.results, job, report.stopped,
                                                                model_extra)
        report.error = report.error or error
        discard_feature_cache(out_dir)
        return report


def _clustering_job(sources: Sequence[SlideSource], job: RunJob, out_dir: Path, progress: ProgressCallback,
                    mapper: GroupMapper | None = None) -> tuple[RunJob, dict[str, float]]:
    """The job for the run's clustering mode (`run_model.prepare_run`) and the fit's seconds per stage; when no
    region of any input has tissue to fit on, each slide is left to fail with its own reason."""
    try:
        prepared, _, seconds = prepare_run(sources, job, out_dir, progress=progress, mapper=mapper)
        return prepared, seconds
    except (InputError, NoTissueError):
        return replace(job, options=replace(job.options, clustering="region")), {}


def _write_run_files(
    out_dir: Path, results: list[SlideResult], job: RunJob, stopped: str | None, model_extra: dict[str, Any]
) -> tuple[Path | None, Path | None, str | None]:
    """`write_run_outputs`, and when the output folder takes no more writes: the earlier run's manifest and table
    go (they would pass for this run's; removing them frees their space), one more try, then a one-line error."""
    failure: OSError | None = None
    for _attempt in range(2):
        try:
            manifest, table = write_run_outputs(out_dir, results, job, stopped=stopped, **model_extra)
            return manifest, table, None
        except OSError as exc:
            if not storage_error(exc, out_dir):
                raise
            failure = exc
            for name in ("manifest.json", "biomarkers.csv"):
                with contextlib.suppress(OSError):
                    (out_dir / name).unlink(missing_ok=True)
    assert failure is not None
    complete = sum(r.status in ("done", "skipped") for r in results)
    return None, None, (f"{storage_message(out_dir, failure)}: manifest.json and biomarkers.csv not written; "
                        f"the {complete} complete slide(s) are recorded in their own folders (slide.json)")
