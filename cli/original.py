"""`equiseg intra` and `equiseg inter`: the original method's command lines, run by the product pipeline.

The published scripts were `python src/intra_subject.py --csv_path ... --output_path ... --weight_path ...`
and `python src/inter_subject.py ... [--test_data_path ...]`; their option spellings are accepted as they
were (dashed spellings too). Outputs are `equiseg run`'s, plus each core's rotation series
(`rotation/<slide>_<core>.png` and `rotation.csv`), which is what the original scripts drew.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from equiseg_wsi.options import RunJob
from equiseg_wsi.robustness import DEFAULT_ANGLES

from .options import Pipeline, pipeline_options, progress_bars, quiet_option

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def original_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The original scripts' options (underscored as published, dashed accepted), then the product's own."""
    options = [
        click.option("--csv_path", "--csv-path", "csv_path", required=True, type=_FILE,
                     help="CSV of cores with a `processed` or `path` column (relative to the CSV's folder) and "
                     "optional `slide`, `core`, `mpp`, `case_id` columns."),
        click.option("--output_path", "--output-path", "output_path", required=True,
                     type=click.Path(file_okay=False, path_type=Path),
                     help="Output folder: `equiseg run`'s outputs plus rotation/ strips and rotation.csv."),
        click.option("--n_clusters", "--n-clusters", "n_clusters", type=click.IntRange(2, 20), default=5,
                     show_default=True, help="K, the number of KMeans clusters (the original scripts' default, 5)."),
        click.option("--n_samples", "--n-samples", "n_samples", type=click.IntRange(min=10), default=2000,
                     show_default=True, help="Tissue positions (feature cells) sampled per core to fit KMeans."),
        click.option("--seed", type=int, default=42, show_default=True,
                     help="Seed of the tissue-position sampling and of KMeans."),
        click.option("--weight_path", "--weight-path", "weight_path", type=_FILE, default=None,
                     help="Model weights (equiseg or reference SRE-Conv .pth), same as --weights. Default: the "
                     "packaged default model (docs/model_card.md)."),
        click.option("--angles", default=DEFAULT_ANGLES, show_default=True,
                     help="Angles of the rotation series in degrees: start:stop:step (stop excluded) or a list "
                     "such as 0,90,180. 0 is always included."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    return pipeline_options(clustering=False)(quiet_option(func))


def _setup(pipeline: Pipeline, weight_path: Path | None, angles: str) -> tuple[RunJob, list[float]]:
    """The job (every core redone: the analyses always overwrite) and the angles, shared by intra and inter."""
    from equiseg_wsi.robustness import parse_angles

    if weight_path is not None and pipeline.weights is not None:
        raise click.UsageError("give the model once: --weight_path or --weights")
    job = pipeline.with_options(overwrite=True).job
    if weight_path is not None:
        job = replace(job, spec=replace(job.spec, weights=str(weight_path)))
    return job, parse_angles(angles)


def _finish(result: Any, out_dir: Path, started: float, quiet: bool, what: str) -> None:
    for line in result.failed:
        click.echo(f"Error: {line}", err=True)
    if not quiet:
        done = sum(r.status == "done" for r in result.slides)
        click.echo(f"{what}: {done} core image(s) segmented, {len(result.series)} rotation series, "
                   f"{len(result.failed)} failure(s); {time.perf_counter() - started:.1f} s; outputs in {out_dir}",
                   err=True)
    if result.failed:
        raise SystemExit(1)


@click.command()
@original_options
@_common
def intra(pipeline: Pipeline, **kw: Any) -> None:
    """Intra-subject analysis (the original `intra_subject.py`): KMeans fitted on each core by itself.

    Runs `equiseg run` on the CSV's cores and writes, per core, the rotation series: the core rotated by
    each angle, segmented with the KMeans fitted at 0° and rotated back (rotation/<slide>_<core>.png, one
    row per angle in rotation.csv). Exit code 1 when any core failed.
    """
    from equiseg_wsi.cohort import intra_subject
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.run_lock import output_lock

    started = time.perf_counter()
    out_dir: Path = kw["output_path"]
    sources = collect_inputs([kw["csv_path"]], mpp=pipeline.options.regions.mpp, exclude=out_dir)
    job, angles = _setup(pipeline, kw["weight_path"], kw["angles"])
    on_region, on_tiles, close = progress_bars(kw["quiet"], "intra")
    try:
        with output_lock(out_dir):  # one run per output folder, as for `equiseg run`
            result = intra_subject(sources, job, out_dir, angles,
                                   on_slide=lambda i, s: on_region(s.name), progress=on_tiles)
    finally:
        close()
    _finish(result, out_dir, started, kw["quiet"], "intra")


@click.command()
@original_options
@click.option("--test_data_path", "--test-data-path", "test_data_path", type=_FILE, default=None,
              help="CSV of test cores (same columns). Default: split --csv_path by slide id: sorted distinct "
              "slide ids, the 1st, 3rd, ... train and the 2nd, 4th, ... test (no slide in both).")
@_common
def inter(pipeline: Pipeline, **kw: Any) -> None:
    """Inter-subject analysis (the original `inter_subject.py`), fitted on EVERY training core.

    Fits one KMeans on --n_samples cells from each training core (`equiseg fit`; saved as
    OUT/kmeans_model.npz), applies it to the test cores (`equiseg run --kmeans-model`), and writes each
    test core's rotation series with that model. Exit code 1 when any core failed.
    """
    from equiseg_wsi.cohort import inter_subject, split_by_slide
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.run_lock import output_lock

    started = time.perf_counter()
    out_dir: Path = kw["output_path"]
    train = collect_inputs([kw["csv_path"]], mpp=pipeline.options.regions.mpp, exclude=out_dir)
    if kw["test_data_path"] is not None:
        test = collect_inputs([kw["test_data_path"]], mpp=pipeline.options.regions.mpp, exclude=out_dir)
    else:
        train, test = split_by_slide(train)
    job, angles = _setup(pipeline, kw["weight_path"], kw["angles"])
    on_region, on_tiles, close = progress_bars(kw["quiet"], "inter")
    try:
        with output_lock(out_dir):
            result = inter_subject(train, test, job, out_dir, angles,
                                   on_slide=lambda i, s: on_region(s.name), on_region=on_region, progress=on_tiles)
    finally:
        close()
    if not kw["quiet"] and result.model is not None:
        click.echo(f"KMeans (K={result.model.k}) fitted on {len(result.model.sources)} training region(s); "
                   f"applied to {len(test)} test core image(s)", err=True)
    _finish(result, out_dir, started, kw["quiet"], "inter")
