"""`equiseg fit`: one KMeans model fitted on tissue cells sampled from every core of a cohort."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .options import Pipeline, pipeline_options, progress_bars, quiet_option


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "model_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model file to write (.npz; numpy arrays and JSON, no pickle). Apply it with "
              "`equiseg run --kmeans-model MODEL`.")
@pipeline_options(min_area=False)
@quiet_option
def fit(inputs: tuple[Path, ...], model_path: Path, pipeline: Pipeline, quiet: bool) -> None:
    """Fit one KMeans model on tissue cells sampled from EVERY core/region of INPUTS (a cohort model).

    INPUTS are what `equiseg run` takes; regions are the ones `run` segments (TMA cores included).
    --n-samples cells are drawn from each region with a generator seeded from --seed and the region's name,
    features are streamed region by region, and the model records the feature identity (weights, layer,
    target µm/px, normalisation) so `run --kmeans-model` refuses features it does not fit. Exit code 1 when
    a region could not be used (the model is still written, fitted on the others, and lists the regions it
    used).
    """
    from equiseg_wsi.cohort import fit_cohort
    from equiseg_wsi.inputs import collect_inputs

    started = time.perf_counter()
    sources = collect_inputs(inputs, mpp=pipeline.options.regions.mpp)
    on_region, on_tiles, close = progress_bars(quiet, "fit")
    try:
        model, failures = fit_cohort(sources, pipeline.job, on_region=on_region, progress=on_tiles)
    finally:
        close()
    model.save(model_path)
    for f in failures:
        click.echo(f"Error: {f.error}", err=True)
    if not quiet:
        click.echo(f"fitted K={model.k} on {model.n_fit_samples} cells from {len(model.sources)} region(s) "
                   f"({len(failures)} failed); {time.perf_counter() - started:.1f} s; model in {model_path}", err=True)
    if failures:
        raise SystemExit(1)
