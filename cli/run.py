"""`equiseg run`: slides in, QuPath GeoJSON, biomarker tables, overlays and a manifest out."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from equiseg_wsi.errors import InputError
from equiseg_wsi.inputs import collect_inputs, read_case_ids
from equiseg_wsi.options import CLUSTERING_MODES, RunOptions

from .options import Pipeline, pipeline_options, quiet_option
from .progress import Progress, logs_through, slide_outcome

if TYPE_CHECKING:
    from equiseg_wsi.runner import Executor, RunReport


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: OUT/<slide>/ per slide, OUT/biomarkers.csv and OUT/manifest.json.")
@click.option("--kmeans-model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Apply this saved cohort model (from `equiseg fit`, or OUT/run-kmeans.npz of an earlier run) "
              "instead of fitting KMeans on this run's cells.")
@click.option("--clustering", type=click.Choice(list(CLUSTERING_MODES)), default=RunOptions().clustering,
              show_default=True,
              help="run: one KMeans fitted on --n-samples cells of every region of every input, so Cluster i is "
              "the same tissue type in every core and slide (saved as OUT/run-kmeans.npz; features are computed "
              "once); slide: one per slide (all cores of a TMA share it); region: one per core or tissue piece "
              "(the paper's intra-subject mode; Cluster 1 is then only each region's darkest).")
@click.option("--cluster-names", default=None, metavar="NAMES",
              help="Comma-separated names of clusters 1..K, e.g. \"Epithelium,Stroma,Lumen\" (one per cluster, no "
              "':'): the QuPath class names in the GeoJSON and the names in the overlays, OUT/cluster_key.png and "
              "the report. Colours and the biomarker columns (c1_...) stay as they are. Look at OUT/cluster_key.png "
              "of a first run to choose them.")
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
@click.option("--report-biomarker", default=None, metavar="COLUMN",
              help="biomarkers.csv column that colours the TMA grids in OUT/report.html (default: c1_fraction).")
@quiet_option
def run(
    inputs: tuple[Path, ...], out_dir: Path, kmeans_model: Path | None, clustering: str, cluster_names: str | None,
    pipeline: Pipeline, simplify: float,
    bounds_offset: bool, case_ids: Path | None, overwrite: bool, scheduler: str | None, workers: int | None,
    quiet: bool, report_biomarker: str | None,
) -> None:
    """Segment every slide or core image in INPUTS and write QuPath GeoJSON, biomarker CSVs and overlays.

    INPUTS are slide files (SVS, TIFF, NDPI, MRXS, ...), plain core images (JPEG/PNG), folders of them
    (searched recursively; a manifest.csv inside gives mpp, slide, core and case_id), and CSV manifests with
    a `path` or `processed` column. A DICOM WSI (a folder of .dcm files, one series) is one slide, named after
    its folder. A plain image is one core; a whole slide is processed as its tissue
    pieces. Exit code 1 when any slide failed (the manifest says why), 0 otherwise.
    """
    from equiseg_wsi.features import build_extractor  # imports torch: only once the options are known to be valid
    from equiseg_wsi.run_files import check_writable
    from equiseg_wsi.run_lock import output_lock
    from equiseg_wsi.runner import load_cluster_model, run_folder
    from equiseg_wsi.stop_signals import signal_name, signal_number, stop_on_signals

    started = time.perf_counter()
    # a run makes millions of short-lived lists (polygon coordinates) and few reference cycles: with Python's
    # default thresholds (700, 10, 10) its cycle collector took 0.83 s of a 19 s 8-core run, 0.17 s with these
    gc.set_threshold(20_000, 20, 20)
    if scheduler and workers:
        raise click.UsageError("give either --scheduler or --workers, not both")
    executor = _executor(scheduler, workers)  # before any work: a missing Dask extra fails at once
    pipeline = pipeline.with_options(simplify_cells=simplify, apply_bounds_offset=bounds_offset, overwrite=overwrite,
                                     case_ids=read_case_ids(case_ids) if case_ids else {}, clustering=clustering,
                                     cluster_names=_names(cluster_names))
    sources = collect_inputs(inputs, mpp=pipeline.options.regions.mpp, exclude=out_dir)
    # SIGTERM and SIGHUP stop the run like Ctrl-C: what completed is recorded (see run_folder)
    with stop_on_signals():
        try:
            with output_lock(out_dir):  # one run per output folder: a second one fails here, before any work
                check_writable(out_dir)
                job = pipeline.job
                identity = build_extractor(job.spec).feature_identity.as_dict()
                if kmeans_model is not None:
                    model = load_cluster_model(str(kmeans_model))
                    assert model is not None
                    model.check_compatible(identity)
                    job = replace(job, kmeans_model=str(kmeans_model), options=replace(
                        job.options, segment=replace(job.options.segment, n_clusters=model.k)))
                with Progress(len(sources), quiet=quiet) as bars, logs_through(bars):
                    report = run_folder(
                        sources, out_dir, job, executor=executor,
                        on_start=lambda i, source: bars.start(i, source.name),
                        on_result=lambda i, result: bars.finish(i, result.name, slide_outcome(result)),
                        progress=bars.units)
                if report_biomarker is not None and report.manifest is not None:  # the run drew the default one
                    from equiseg_wsi.export.report import write_report

                    write_report(out_dir, biomarker=report_biomarker)
        except KeyboardInterrupt as exc:  # before the first slide, or while the run's files were written
            signum = signal_number(exc)
            click.echo(f"Stopped by {signal_name(signum)} before the run was recorded in {out_dir / 'manifest.json'};"
                       " rerun the same command to resume", err=True)
            raise SystemExit(128 + signum) from None
    _report(report, quiet, started, out_dir)


def _names(text: str | None) -> tuple[str, ...]:
    """`--cluster-names "A,B,C"` as ("A", "B", "C") (each stripped); () when not given."""
    return () if text is None else tuple(n.strip() for n in text.split(","))


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


def _report(report: RunReport, quiet: bool, started: float, out_dir: Path) -> None:
    """Warnings and errors, then one line: the summary, or why the run stopped early (exit 128 + the signal's
    number after a signal, 1 after a full or read-only output folder or when any slide failed)."""
    results = report.results
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        for line in r.warnings if r.status == "done" else []:
            click.echo(f"Warning: {r.name}: {line}", err=True)
    for r in failed:
        if r.error != report.stopped:  # the slide the full disk stopped at: said once, below
            click.echo(f"Error: {r.error}", err=True)
    complete = sum(r.status in ("done", "skipped") for r in results)
    recorded = f", recorded in {report.manifest}" if report.manifest is not None else ""
    if report.error is not None:
        click.echo(f"Error: {report.error}{recorded}; free some space (or make the folder writable) and rerun the "
                   "same command to resume", err=True)
        raise SystemExit(1)
    if report.signum is not None:
        click.echo(f"Stopped by {report.stopped}: {complete} of {len(results)} slide(s) complete{recorded}; rerun "
                   "the same command to resume", err=True)
        raise SystemExit(128 + report.signum)
    manifest = report.manifest
    assert manifest is not None
    if not quiet:
        from equiseg_wsi.biomarkers import is_measured
        from equiseg_wsi.run_key import redo_summary

        done = sum(r.status == "done" for r in results)
        skipped = sum(r.status == "skipped" for r in results)
        regions = sum(is_measured(row) for r in results for row in r.regions)  # not the missing TMA cores' rows
        redone = redo_summary(r.redone for r in results if r.status == "done")
        click.echo(
            f"{done} slide(s) done, {skipped} skipped (already complete), {len(failed)} failed; "
            f"{redone + '; ' if redone else ''}{regions} region(s); "
            f"{time.perf_counter() - started:.1f} s; outputs in {out_dir} (manifest: {manifest.name})",
            err=True,
        )
    if failed:
        raise SystemExit(1)
