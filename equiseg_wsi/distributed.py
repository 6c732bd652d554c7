"""Many slides on a Dask cluster: one task per slide, workers keep the model loaded, results stay small.

Workers write each slide's files to the output folder themselves (shared storage on a real cluster) and
return only the `SlideResult`; the caller writes the run manifest. With a local cluster the same machine's
cores are split between worker processes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.errors import InputError
from equiseg_wsi.features import ExtractorSpec
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.runner import RunOptions, SlideResult, process_slide


@functools.lru_cache(maxsize=4)
def _cached_cluster_model(path: str) -> ClusterModel:
    return ClusterModel.load(path)


def slide_task(
    source: SlideSource, out_dir: str, spec: ExtractorSpec, options: RunOptions, kmeans_model: str | None
) -> SlideResult:
    """What a worker runs for one slide; the extractor and cluster model are loaded once per worker process."""
    extractor, identity = spec.build()
    model = _cached_cluster_model(kmeans_model) if kmeans_model else None
    return process_slide(source, Path(out_dir), extractor, options, identity, model=model)


def run_on_dask(
    sources: Sequence[SlideSource],
    out_dir: Path,
    spec: ExtractorSpec,
    options: RunOptions,
    *,
    kmeans_model: Path | None = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    on_result: Callable[[int, SlideResult], None] | None = None,
) -> list[SlideResult]:
    """Process `sources` on the scheduler at `scheduler` (tcp://host:port) or on a local cluster of `n_workers`.

    Results come back in input order whatever order the workers finish in. A worker that dies on a slide
    (killed, out of memory) fails that slide only. Tasks ask for one `GPU` resource when the device is CUDA,
    so start GPU workers with `--resources GPU=1` (one per GPU).
    """
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise InputError("distributed runs need Dask: pip install 'equiseg-wsi[distributed]'") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    cluster = None
    if scheduler is None:
        workers = max(1, n_workers or 1)
        threads = max(1, (os.cpu_count() or 1) // workers)
        # torch reads OMP_NUM_THREADS at import: give each worker process its share of the cores
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    try:
        with Client(scheduler if scheduler is not None else cluster) as client:
            resources = {"GPU": 1} if spec.device.startswith("cuda") else None
            futures = {
                client.submit(slide_task, source, str(out_dir), spec, options,
                              str(kmeans_model) if kmeans_model else None,
                              key=f"equiseg-slide-{i}-{source.name}", pure=False, resources=resources): i
                for i, source in enumerate(sources)
            }
            results: list[SlideResult | None] = [None] * len(sources)
            for future in as_completed(futures):
                i = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # the worker itself failed (killed, lost): this slide only
                    source = sources[i]
                    result = SlideResult(name=source.name, path=str(source.path), status="failed",
                                         error=f"{source.path}: worker failed: {exc.__class__.__name__}: {exc}")
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
    finally:
        if cluster is not None:
            cluster.close()
    return [r for r in results if r is not None]
