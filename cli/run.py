"""`equiseg run`: slides in, QuPath GeoJSON, biomarker tables, overlays and a manifest out."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from tqdm import tqdm

from equiseg_wsi.errors import InputError
from equiseg_wsi.inputs import collect_inputs, read_case_ids

from .options import Pipeline, pipeline_options, quiet_option

if TYPE_CHECKING:
    from equiseg_wsi.runner import Executor


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: OUT/<slide>/ per slide, OUT/biomarkers.csv and OUT/manifest.json.")
@click.option("--kmeans-model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Apply this saved cohort model (from `equiseg fit`) instead of fitting KMeans per region.")
@pipeline_options()
@click.option("--simplify", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Polygon simplification tolerance, in feature cells (8 px at --target-mpp). 0 keeps the exact "
              "cell edges (areas equal the label map's); about 1 smooths cluster borders with ~30% fewer vertices, "
              "never opening gaps between neighbours.")
@click.option("--bounds-offset/--no-bounds-offset", default=True, show_default=True,
              help="Subtract OpenSlide's bounds-x/-y from exported coordinates, as QuPath crops MRXS slides there.")
@click.option("--case-ids", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV mapping TMA core names (A-1, ...) to case ids; they land in biomarkers.csv and the .qptma.")
@click.option("--overwrite/--resume", default=False, show_default=True,
              help="--resume skips slides whose outputs are complete from an earlier run with the same options, model "
              "and input (others are redone); --overwrite redoes them all.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Send one task per slide to this Dask scheduler (tcp://host:port); workers must see INPUTS and "
              "the output folder at the same paths. Default: run in this process.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Start a local Dask cluster with this many worker processes (each gets its share of the CPU "
              "cores). Default: run in this process.")
@quiet_option
def run(
    inputs: tuple[Path, ...], out_dir: Path, kmeans_model: Path | None, pipeline: Pipeline, simplify: float,
    bounds_offset: bool, case_ids: Path | None, overwrite: bool, scheduler: str | None, workers: int | None,
    quiet: bool,
) -> None:
    """Segment every slide or core image in INPUTS and write QuPath GeoJSON, biomarker CSVs and overlays.

    INPUTS are slide files (SVS, TIFF, NDPI, MRXS, ...), plain core images (JPEG/PNG), folders of them
    (searched recursively; a manifest.csv inside gives mpp, slide, core and case_id), and CSV manifests with
    a `path` or `processed` column. A plain image is one core; a whole slide is processed as its tissue
    pieces. Exit code 1 when any slide failed (the manifest says why), 0 otherwise.
    """
    from equiseg_wsi.features import build_extractor  # imports torch: only once the options are known to be valid
    from equiseg_wsi.runner import check_writable, load_cluster_model, run_slides, write_run_outputs

    started = time.perf_counter()
    if scheduler and workers:
        raise click.UsageError("give either --scheduler or --workers, not both")
    pipeline = pipeline.with_options(simplify_cells=simplify, apply_bounds_offset=bounds_offset, overwrite=overwrite,
                                     case_ids=read_case_ids(case_ids) if case_ids else {})
    sources = collect_inputs(inputs, mpp=pipeline.options.regions.mpp, exclude=out_dir)
    check_writable(out_dir)
    job = pipeline.job
    identity = build_extractor(job.spec).feature_identity.as_dict()
    if kmeans_model is not None:
        model = load_cluster_model(str(kmeans_model))
        assert model is not None
        model.check_compatible(identity)
        job = replace(job, kmeans_model=str(kmeans_model),
                      options=replace(job.options, segment=replace(job.options.segment, n_clusters=model.k)))
    show = not quiet and sys.stderr.isatty()
    slides_bar = tqdm(total=len(sources), desc="slides", unit="slide", disable=not show, position=0)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=not show, position=1, leave=False)

    def on_start(i: int, source: object) -> None:
        slides_bar.n = i
        slides_bar.set_postfix_str(getattr(source, "name", ""))
        slides_bar.refresh()
        tiles_bar.reset()

    def on_result(i: int, result: object) -> None:
        slides_bar.update(1)

    def on_tiles(done: int, total: int, what: str) -> None:
        tiles_bar.total = total
        tiles_bar.n = done
        tiles_bar.refresh()

    results = run_slides(sources, out_dir, job, executor=_executor(scheduler, workers), on_start=on_start,
                         on_result=on_result, progress=on_tiles)
    slides_bar.n = len(sources)
    slides_bar.close()
    tiles_bar.close()
    manifest, _ = write_run_outputs(out_dir, results, job)
    _report(results, quiet, started, out_dir, manifest)


def _executor(scheduler: str | None, workers: int | None) -> Executor:
    """In this process, or on Dask when a scheduler address or a number of local workers is given."""
    if not (scheduler or workers):
        from equiseg_wsi.runner import InProcess

        return InProcess()
    try:
        import distributed  # noqa: F401  (configures its loggers on import; quiet them unless -vv)
    except ImportError:
        raise InputError("--scheduler and --workers need Dask: pip install 'equiseg-wsi[distributed]'") from None
    from equiseg_wsi.distributed import DaskExecutor

    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("distributed").setLevel(logging.ERROR)
    return DaskExecutor(scheduler, workers)


def _report(results: list[Any], quiet: bool, started: float, out_dir: Path, manifest: Path) -> None:
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        for line in r.warnings if r.status == "done" else []:
            click.echo(f"Warning: {r.name}: {line}", err=True)
    for r in failed:
        click.echo(f"Error: {r.error}", err=True)
    if not quiet:
        from equiseg_wsi.run_key import redo_summary

        done = sum(r.status == "done" for r in results)
        skipped = sum(r.status == "skipped" for r in results)
        regions = sum(len(r.regions) for r in results)
        redone = redo_summary(r.redone for r in results if r.status == "done")
        click.echo(
            f"{done} slide(s) done, {skipped} skipped (already complete), {len(failed)} failed; "
            f"{redone + '; ' if redone else ''}{regions} region(s); "
            f"{time.perf_counter() - started:.1f} s; outputs in {out_dir} (manifest: {manifest.name})",
            err=True,
        )
    if failed:
        raise SystemExit(1)
