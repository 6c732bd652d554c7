"""`equiseg fit`: one KMeans model fitted on tissue cells sampled from every core of a cohort.

Also home of the clustering and region options that `fit`, `robustness`, `intra` and `inter` share with `run`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from equiseg_cli.options import backend_option, feature_options, mpp_option, quiet_option


def clustering_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--n-clusters, --n-samples, --seed: how KMeans is fitted (same meaning and defaults as `run`)."""
    options = [
        click.option("--n-clusters", type=click.IntRange(2, 20), default=3, show_default=True,
                     help="K, the number of KMeans clusters (segments)."),
        click.option("--n-samples", type=click.IntRange(min=10), default=2000, show_default=True,
                     help="Tissue positions (feature cells) sampled per core/region to fit KMeans."),
        click.option("--seed", type=int, default=42, show_default=True,
                     help="Seed of the tissue-position sampling and of KMeans."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


min_area_option = click.option(
    "--min-area", type=click.FloatRange(min=0), default=2000.0, show_default=True,
    help="Smallest segment kept, in µm²; smaller pieces join the neighbouring segment.",
)


def region_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """How regions are found and segmented, exactly as in `run` (same option names, units and defaults)."""
    options = [
        click.option("--tile-size", type=click.IntRange(min=64), default=512, show_default=True,
                     help="Tile interior in pixels at --target-mpp (multiple of 8); larger tiles need more memory."),
        click.option("--tissue-mpp", type=click.FloatRange(min=0, min_open=True), default=8.0, show_default=True,
                     help="Resolution of the tissue mask, in µm/px."),
        click.option("--min-tissue-area", type=click.FloatRange(min=0), default=20000.0, show_default=True,
                     help="Smallest tissue piece processed as a region of a whole slide, in µm² (debris is "
                     "ignored)."),
        click.option("--tma/--no-tma", default=None,
                     help="Treat whole slides as TMAs (one region per core, named like QuPath, A-1) or never. "
                     "Default: detect TMA slides automatically."),
        click.option("--core-diameter", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="TMA core diameter in µm. Default: estimated from the slide."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def progress_bars(quiet: bool, what: str) -> tuple[Callable[[str], None], Callable[[int, int, str], None],
                                                    Callable[[], None]]:
    """tqdm bars (off with --quiet or when stderr is not a terminal): one per core/region, one for its tiles."""
    show = not quiet and sys.stderr.isatty()
    outer = tqdm(desc=what, unit="region", disable=not show, position=0)
    inner = tqdm(desc="tiles", unit="tile", disable=not show, position=1, leave=False)
    seen: list[str] = []

    def on_region(name: str) -> None:
        outer.n = len(seen)
        seen.append(name)
        outer.set_postfix_str(name)
        inner.reset()

    def on_tiles(done: int, total: int, unit: str) -> None:
        inner.total = total
        inner.n = done
        inner.refresh()

    def close() -> None:
        outer.n = len(seen)
        outer.close()
        inner.close()

    return on_region, on_tiles, close


def run_options(
    extractor: Any, *, n_clusters: int, n_samples: int, seed: int, target_mpp: float, halo: int | None,
    tile_size: int, min_area: float, mpp: float | None, backend: str, tissue_mpp: float, min_tissue_area: float,
    tma: bool | None, core_diameter: float | None,
) -> Any:
    """The RunOptions these shared options describe (the same object `run` builds)."""
    from equiseg_wsi.runner import RunOptions
    from equiseg_wsi.segment import SegmentOptions

    return RunOptions(
        segment=SegmentOptions(
            n_clusters=n_clusters, n_samples=n_samples, seed=seed, target_mpp=target_mpp, tile_size=tile_size,
            halo=halo if halo is not None else extractor.recommended_halo, batch_size=extractor.batch_size,
            min_segment_um2=min_area,
        ),
        backend=backend, mpp=mpp, tissue_mpp=tissue_mpp, tissue_min_area_um2=min_tissue_area, tma=tma,
        core_diameter_um=core_diameter,
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
        extractor, n_clusters=n_clusters, n_samples=n_samples, seed=seed, target_mpp=target_mpp, halo=halo,
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
