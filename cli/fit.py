"""`equiseg fit`: one KMeans model fitted on tissue cells sampled from every core of a cohort."""

from __future__ import annotations

import time
from pathlib import Path

import click

from equiseg_cli.options import (
    backend_option,
    clustering_options,
    feature_options,
    mpp_option,
    progress_bars,
    quiet_option,
    region_options,
    run_options,
)


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "model_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model file to write (.npz; numpy arrays and JSON, no pickle). Apply it with "
              "`equiseg run --kmeans-model MODEL`.")
@clustering_options
@feature_options
@mpp_option
@backend_option
@region_options
@quiet_option
def fit(
    inputs: tuple[Path, ...], model_path: Path, n_clusters: int, n_samples: int, seed: int, weights: Path | None,
    target_mpp: float, layer: str, device: str, batch_size: int | None, halo: int | None, mpp: float | None,
    backend: str, tile_size: int, tissue_mpp: float, min_tissue_area: float, tma: bool | None,
    core_diameter: float | None, quiet: bool,
) -> None:
    """Fit one KMeans model on tissue cells sampled from EVERY core/region of INPUTS (a cohort model).

    INPUTS are what `equiseg run` takes; regions are the ones `run` segments (TMA cores included).
    --n-samples cells are drawn from each region with a generator seeded from --seed and the region's name,
    features are streamed region by region, and the model records the feature identity (weights, layer,
    target µm/px, normalisation) so `run --kmeans-model` refuses features it does not fit. Exit code 1 when
    a region could not be used
    (the model is still written, fitted on the others, and lists the regions it used).
    """
    from equiseg_wsi.cohort import fit_cohort
    from equiseg_wsi.features import build_extractor
    from equiseg_wsi.inputs import collect_inputs

    started = time.perf_counter()
    sources = collect_inputs(inputs, mpp=mpp)
    extractor, identity = build_extractor(weights, layer=layer, device=device, batch_size=batch_size,
                                          target_mpp=target_mpp)
    options = run_options(
        n_clusters=n_clusters, n_samples=n_samples, seed=seed, target_mpp=target_mpp, halo=halo,
        tile_size=tile_size, min_area=2000.0, mpp=mpp, backend=backend, tissue_mpp=tissue_mpp,
        min_tissue_area=min_tissue_area, tma=tma, core_diameter=core_diameter,
    )
    on_region, on_tiles, close = progress_bars(quiet, "fit")
    try:
        model, failures = fit_cohort(sources, extractor, identity, options, on_region=on_region, progress=on_tiles)
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
