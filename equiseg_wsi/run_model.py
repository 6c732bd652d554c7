"""One KMeans for many regions: the run-wide (default) and per-slide clustering modes, and `equiseg fit`.

Why: with a KMeans per region, "Cluster 1" is only the darkest cluster of each core, so biomarker columns of two
cores are not comparable (on the sample cores, Cluster 1's mean optical density ranged 0.19-0.40). One model
fitted on cells sampled from every region (each region offers `n_samples` interior tissue cells, drawn with a
generator seeded from the run seed and the region's name) and applied to all makes Cluster i the same tissue
type everywhere. Features are computed once: the fit stores each region's features in a `FeatureCache`, and the
segmentation that follows reads them back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from equiseg_wsi import forked
from equiseg_wsi.cluster import ClusterModel, fit_kmeans, optical_density
from equiseg_wsi.errors import InputError
from equiseg_wsi.export.atomic import atomic_write_text
from equiseg_wsi.features import build_extractor
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import RunJob
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.regions import Failures, RegionFailure, RegionItem, regions_of
from equiseg_wsi.run_key import file_digest, options_digest
from equiseg_wsi.sampling import CohortSampler, ReservoirSampler, source_rng
from equiseg_wsi.segment import FeatureCache, fit_cells, region_features
from equiseg_wsi.threads import ordered_map
from equiseg_wsi.tile_features import GroupMapper, remote_tiles

__all__ = ["FIT_ROWS_CAP", "RUN_MODEL", "discard_feature_cache", "fit_regions", "prepare_run"]

FIT_THREADS = 2  # inputs whose features are computed at once in a run-wide fit (each on one torch thread)
# A distributed run's fit keeps this many inputs, and regions of each, with tiles on the workers at once (a thread
# each here, waiting for them), so the workers do not wait while this process gathers and caches a region's
# features: enough one-tile cores for 8 workers; a large slide's regions two at a time.
REMOTE_INPUTS = 8
REMOTE_REGIONS = 2
FIT_ROWS_CAP = 50_000  # sampled cells a run-wide fit uses at most (a seeded subset beyond): KMeans stays cheap
RUN_MODEL = "run-kmeans.npz"  # the run-wide model in the output folder (apply it elsewhere with --kmeans-model)
FEATURE_CACHE = ".equiseg-features"  # region features between the fit and the segmentation, removed as used
_ROWS_PER_CHUNK = 64  # feature-map rows fed to the sampler at a time (bounded memory for memory-mapped maps)


def fit_regions(
    sources: Sequence[SlideSource],
    job: RunJob,
    *,
    n_init: int = 10,
    cache: FeatureCache | None = None,
    on_region: Callable[[str], None] | None = None,
    progress: ProgressCallback = no_progress,
    seconds: dict[str, float] | None = None,
    mapper: GroupMapper | None = None,
) -> tuple[ClusterModel, Failures]:
    """Fit one KMeans on `n_samples` interior tissue cells (`segment.fit_cells`) from every region of `sources`.

    Regions are found as `equiseg run` finds them; features are streamed region by region (and kept in `cache`
    when given), `FIT_THREADS` inputs at a time; at most `FIT_ROWS_CAP` of the sampled rows are fitted on (a
    seeded subset). Regions that fail are returned as failures; raises InputError when no tissue cell was
    sampled at all. `seconds`, when given, receives the time spent per stage: opening slides and finding
    regions, reading tiles, the network, the fit (summed over the threads, or over the workers when `mapper`, a
    distributed run's, computes regions of several tiles on them)."""
    times = seconds if seconds is not None else {}
    for stage in ("regions", "read", "cnn", "kmeans"):
        times.setdefault(stage, 0.0)
    seg = job.options.segment
    extractor = build_extractor(job.spec)
    sampler = CohortSampler(seg.n_samples, seg.seed)
    failures = Failures()

    def sample(source: SlideSource, region: Callable[[str], None] | None, tiles: ProgressCallback) -> _SourceSample:
        return _sample_source(source, job, cache, region, tiles, mapper)

    if mapper is None:
        threads = min(FIT_THREADS, len(sources), os.cpu_count() or 1)
    else:  # a distributed run's workers do the network work: these threads wait for them
        threads = min(REMOTE_INPUTS, len(sources))
    with _inputs_at_once(sample, sources, threads, on_region, progress,
                         mapper is None and forked.use_processes(extractor.device)) as parts:
        for part in parts:
            failures.items.extend(part.failures)
            for stage, secs in part.seconds.items():
                times[stage] += secs
            for key, rows, od in part.samples:  # a sample of n_samples rows or fewer: the sampler keeps them all
                sampler.feed(key, rows, od)
    if not sampler.sources:
        reasons = "; ".join(f.error for f in failures) or "no inputs"
        raise InputError(f"no tissue cells to fit on ({reasons})")
    features, od, _ = sampler.result()
    if features.shape[0] > FIT_ROWS_CAP:
        keep = np.sort(np.random.default_rng(seg.seed).choice(features.shape[0], FIT_ROWS_CAP, replace=False))
        features, od = features[keep], od[keep]
    clock = time.perf_counter()
    model = fit_kmeans(features, od, seg.n_clusters, seg.seed, n_init=n_init,
                       feature_identity=extractor.feature_identity.as_dict(), sources=sampler.sources)
    times["kmeans"] += time.perf_counter() - clock
    for stage in times:
        times[stage] = round(times[stage], 3)
    return model, failures


@contextlib.contextmanager
def _inputs_at_once(
    sample: Callable[[SlideSource, Callable[[str], None] | None, ProgressCallback], _SourceSample],
    sources: Sequence[SlideSource], threads: int, on_region: Callable[[str], None] | None,
    progress: ProgressCallback, processes: bool,
) -> Iterator[Iterator[_SourceSample]]:
    """Each input's sample in input order, `threads` inputs at once: on forked processes when `processes` (their
    callbacks relayed here; 200 EBHI tiles' fit 19.9-24.6 -> 16.2-18.1 s), else on threads."""
    with contextlib.ExitStack() as stack:
        parts: Generator[_SourceSample, None, None]
        if threads > 1 and processes:
            relay = stack.enter_context(forked.Relay())
            region, tiles = relay.wrap(on_region), relay.wrap(progress) or no_progress
            parts = forked.forked_map(lambda s: sample(s, region, tiles), sources, threads,
                                      initializer=_one_torch_thread)
        else:
            parts = ordered_map(lambda s: sample(s, on_region, progress), sources, threads,
                                initializer=_one_torch_thread)
        stack.callback(parts.close)  # on an error too: the running inputs are waited for before it goes on
        yield parts


@dataclass
class _SourceSample:
    """One input's share of a run-wide fit: each region's sampled rows (key, features, optical density)."""

    samples: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    failures: list[RegionFailure] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _sample_source(source: SlideSource, job: RunJob, cache: FeatureCache | None,
                   on_region: Callable[[str], None] | None, progress: ProgressCallback,
                   mapper: GroupMapper | None) -> _SourceSample:
    """Every region of `source` through the network (kept in `cache`), and a seeded sample of its fit cells
    (the reservoir `CohortSampler` would draw for it: seeded by the region's key, not by the order of inputs).
    With `mapper` (a distributed run) `REMOTE_REGIONS` regions have their tiles on the workers at once."""
    seg = job.options.segment
    extractor = build_extractor(job.spec)
    failures = Failures()
    out = _SourceSample(seconds={"regions": 0.0, "read": 0.0, "cnn": 0.0})
    remote = None if mapper is None else remote_tiles(
        mapper, job.options.regions.backend, source.mpp or job.options.regions.mpp, job.spec, seg)

    def region(item: RegionItem) -> tuple[tuple[str, np.ndarray, np.ndarray] | None, dict[str, float], Failures]:
        if on_region is not None:
            on_region(item.key)
        sample, seconds, failed = None, {"read": 0.0, "cnn": 0.0}, Failures()  # failures kept in region order
        with failed.catch(item.source.name, item.area.name):
            with region_features(item.slide, item.area, extractor, seg, progress=progress, cache=cache,
                                 remote=remote) as rf:
                reservoir = ReservoirSampler(seg.n_samples, source_rng(seg.seed, item.key))
                _feed(reservoir, rf.features, fit_cells(rf.tissue, seg.n_clusters), rf.rgb)
                if reservoir.n_seen:
                    sample = (item.key, *reservoir.result())
                seconds = {stage: rf.seconds.get(stage, 0.0) for stage in seconds}
        return sample, seconds, failed

    clock = time.perf_counter()
    with regions_of(source, job.options.regions, failures, cache=None if cache is None else cache.folder) as items:
        out.seconds["regions"] += time.perf_counter() - clock
        for sample, seconds, failed in ordered_map(region, items, 1 if mapper is None else REMOTE_REGIONS):
            failures.items.extend(failed)
            if sample is not None:
                out.samples.append(sample)
            for stage, secs in seconds.items():
                out.seconds[stage] += secs
    out.failures = list(failures)
    return out


def _one_torch_thread() -> None:
    """In each fit thread: the network on one core. Two small inputs at once beat one on two threads (336-px
    tiles: 16.5 against 27.0 s for 200 EBHI tiles); for 1.4k-px cores they are even (71.3 against 73.5 s)."""
    torch.set_num_threads(1)


def _feed(sampler: ReservoirSampler, features: np.ndarray, cells: np.ndarray, rgb: np.ndarray) -> None:
    """Offer a region's fit cells to the sampler a band of rows at a time (never the whole map in RAM)."""
    for r0 in range(0, cells.shape[0], _ROWS_PER_CHUNK):
        band = slice(r0, r0 + _ROWS_PER_CHUNK)
        mask = cells[band]
        if mask.any():
            sampler.feed(np.asarray(features[band])[mask], optical_density(rgb[band])[mask])


def _fit_key(sources: Sequence[SlideSource], job: RunJob) -> str:
    """What the run-wide model depends on: every input file (path, size, time), the options and the model."""
    files = []
    for s in sources:
        try:
            st = Path(s.path).stat()
            files.append([str(Path(s.path).resolve()), s.name, st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([str(s.path), s.name])
    extractor = build_extractor(job.spec)
    text = json.dumps({"files": files, "options": options_digest(job.options),
                       "features": extractor.feature_identity.as_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_run(
    sources: Sequence[SlideSource],
    job: RunJob,
    out_dir: Path,
    *,
    on_region: Callable[[str], None] | None = None,
    progress: ProgressCallback = no_progress,
    mapper: GroupMapper | None = None,
) -> tuple[RunJob, Failures, dict[str, float]]:
    """The job every slide of the run is segmented with, for the run's clustering mode, and the seconds per stage
    of the run-wide fit (empty when nothing was fitted here).

    `run` (without a given --kmeans-model): one model fitted on every region of every input, written to
    `OUT/run-kmeans.npz` with the key of what it was fitted on (`.json` beside it); a rerun with the same
    inputs, options and model reuses it without computing anything, so finished slides stay finished. `slide`:
    each slide fits its own model when it is segmented (`runner`). `region`: one model per region. The
    feature cache is set for `run` and `slide` so features are computed once. `mapper`: see `fit_regions`."""
    mode = job.options.clustering
    if mode == "region" or job.kmeans_model is not None:
        return job, Failures(), {}
    cache = str(out_dir / FEATURE_CACHE)
    if mode == "slide":
        return replace(job, feature_cache=cache), Failures(), {}
    model_path, key_path = out_dir / RUN_MODEL, out_dir / (RUN_MODEL[: -len(".npz")] + ".json")
    key = _fit_key(sources, job)
    try:
        recorded = json.loads(key_path.read_text(encoding="utf-8"))
        reuse = (recorded.get("fit_key") == key and model_path.is_file()
                 and recorded.get("model_sha256") == file_digest(str(model_path)))
    except (OSError, ValueError, AttributeError):
        reuse = False
    failures = Failures()
    seconds: dict[str, float] = {}
    if not reuse or job.options.overwrite:
        start = time.perf_counter()
        model, failures = fit_regions(sources, job, cache=FeatureCache(cache), on_region=on_region,
                                      progress=progress, seconds=seconds, mapper=mapper)
        seconds["wall"] = round(time.perf_counter() - start, 3)  # the stages are sums over threads
        model.save(model_path)
        atomic_write_text(key_path, json.dumps({"fit_key": key, "model_sha256": file_digest(str(model_path)),
                                                "regions": len(model.sources), "seconds": seconds}, indent=1) + "\n")
    return replace(job, kmeans_model=str(model_path), feature_cache=cache), failures, seconds


def discard_feature_cache(out_dir: Path) -> None:
    """Remove what is left of the run's feature cache (regions that failed after their features were cached)."""
    shutil.rmtree(out_dir / FEATURE_CACHE, ignore_errors=True)
