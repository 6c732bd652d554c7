"""`equiseg run`: slides in, QuPath GeoJSON, biomarker tables, overlays and a manifest out."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
from tqdm import tqdm

from equiseg_cli.options import (
    backend_option,
    clustering_options,
    feature_options,
    min_area_option,
    mpp_option,
    quiet_option,
    region_options,
    run_options,
)
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.inputs import collect_inputs
from equiseg_wsi.runner import check_writable, run_slides, write_run_outputs
from equiseg_wsi.tma import read_case_ids


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: OUT/<slide>/ per slide, OUT/biomarkers.csv and OUT/manifest.json.")
@clustering_options
@click.option("--kmeans-model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Apply this saved cohort model (from `equiseg fit`) instead of fitting KMeans per region.")
@feature_options
@mpp_option
@backend_option
@region_options
@min_area_option
@click.option("--simplify", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Polygon simplification tolerance, in feature cells (8 px at --target-mpp). 0 keeps the exact "
              "cell edges (areas equal the label map's); about 1 smooths cluster borders with ~30% fewer vertices, "
              "never opening gaps between neighbours.")
@click.option("--bounds-offset/--no-bounds-offset", default=True, show_default=True,
              help="Subtract OpenSlide's bounds-x/-y from exported coordinates, as QuPath crops MRXS slides there.")
@click.option("--case-ids", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV mapping TMA core names (A-1, ...) to case ids; they land in biomarkers.csv and the .qptma.")
@click.option("--overwrite/--resume", default=False, show_default=True,
              help="--resume skips slides whose outputs are complete from an earlier run; --overwrite redoes them.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Send one task per slide to this Dask scheduler (tcp://host:port); workers must see INPUTS and "
              "the output folder at the same paths. Default: run in this process.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Start a local Dask cluster with this many worker processes (each gets its share of the CPU "
              "cores). Default: run in this process.")
@quiet_option
def run(
    inputs: tuple[Path, ...], out_dir: Path, n_clusters: int, n_samples: int, seed: int,
    kmeans_model: Path | None, weights: Path | None, target_mpp: float, layer: str, device: str,
    batch_size: int | None, halo: int | None, mpp: float | None, backend: str, tile_size: int, min_area: float,
    tissue_mpp: float, min_tissue_area: float, simplify: float, bounds_offset: bool, tma: bool | None,
    core_diameter: float | None, case_ids: Path | None, overwrite: bool, scheduler: str | None,
    workers: int | None, quiet: bool,
) -> None:
    """Segment every slide or core image in INPUTS and write QuPath GeoJSON, biomarker CSVs and overlays.

    INPUTS are slide files (SVS, TIFF, NDPI, MRXS, ...), plain core images (JPEG/PNG), folders of them
    (searched recursively; a manifest.csv inside gives mpp, slide, core and case_id), and CSV manifests with
    a `path` or `processed` column. A plain image is one core; a whole slide is processed as its tissue
    pieces. Exit code 1 when any slide failed (the manifest says why), 0 otherwise.
    """
    from equiseg_wsi.features import ExtractorSpec

    started = time.perf_counter()
    if scheduler and workers:
        raise click.UsageError("give either --scheduler or --workers, not both")
    sources = collect_inputs(inputs, mpp=mpp, exclude=out_dir)
    check_writable(out_dir)
    spec = ExtractorSpec(str(weights) if weights else None, layer, device, batch_size, target_mpp)
    extractor, identity = spec.build()
    model = None
    if kmeans_model is not None:
        model = ClusterModel.load(kmeans_model)
        model.check_compatible(identity)
    options = replace(
        run_options(
            n_clusters=model.k if model is not None else n_clusters, n_samples=n_samples, seed=seed,
            target_mpp=target_mpp, halo=halo, tile_size=tile_size, min_area=min_area, mpp=mpp, backend=backend,
            tissue_mpp=tissue_mpp, min_tissue_area=min_tissue_area, tma=tma, core_diameter=core_diameter,
        ),
        simplify_cells=simplify, apply_bounds_offset=bounds_offset, overwrite=overwrite,
        case_ids=read_case_ids(case_ids) if case_ids else {},
    )
    show = not quiet and sys.stderr.isatty()
    slides_bar = tqdm(total=len(sources), desc="slides", unit="slide", disable=not show, position=0)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=not show, position=1, leave=False)

    def on_slide(i: int, source: object) -> None:
        slides_bar.n = i
        slides_bar.set_postfix_str(getattr(source, "name", ""))
        slides_bar.refresh()
        tiles_bar.reset()

    def on_tiles(done: int, total: int, what: str) -> None:
        tiles_bar.total = total
        tiles_bar.n = done
        tiles_bar.refresh()

    if scheduler or workers:
        import distributed  # noqa: F401  (configures its loggers on import; quiet them unless -vv)

        from equiseg_wsi.distributed import run_on_dask

        if logging.getLogger().level > logging.DEBUG:
            logging.getLogger("distributed").setLevel(logging.ERROR)

        def on_result(i: int, result: object) -> None:
            slides_bar.update(1)

        results = run_on_dask(sources, out_dir, spec, options, kmeans_model=kmeans_model, scheduler=scheduler,
                              n_workers=workers, on_result=on_result)
    else:
        results = run_slides(sources, out_dir, extractor, options, identity, model=model,
                             on_slide=on_slide, progress=on_tiles)
    slides_bar.n = len(sources)
    slides_bar.close()
    tiles_bar.close()
    model_info = {"extractor": identity, "kmeans_model": str(kmeans_model) if kmeans_model else None}
    manifest, _ = write_run_outputs(out_dir, results, options, model_info)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        click.echo(f"Error: {r.error}", err=True)
    if not quiet:
        done = sum(r.status == "done" for r in results)
        skipped = sum(r.status == "skipped" for r in results)
        regions = sum(len(r.regions) for r in results)
        click.echo(
            f"{done} slide(s) done, {skipped} skipped (already complete), {len(failed)} failed; {regions} region(s); "
            f"{time.perf_counter() - started:.1f} s; outputs in {out_dir} (manifest: {manifest.name})",
            err=True,
        )
    if failed:
        raise SystemExit(1)
