"""`equiseg robustness`: rotate every core, segment it again with frozen models, measure what changes."""

from __future__ import annotations

import time
from pathlib import Path

import click

from equiseg_wsi.robustness import DEFAULT_ANGLES

from .options import Pipeline, pipeline_options, progress_bars, quiet_option


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: robustness.csv, summary.csv, by_angle.csv, robustness.png, worst_<model>.png.")
@click.option("--angles", default=DEFAULT_ANGLES, show_default=True,
              help="Rotation angles in degrees, counter-clockwise: start:stop:step (stop excluded) or a list "
              "such as 0,45,90. 0 is always added as the reference; multiples of 90 are reported apart.")
@click.option("--models", nargs=2, type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              metavar="A.pth B.pth",
              help="Compare these two weight files. Default: the model `equiseg run` uses (the packaged SRE weights, "
              "equiseg_wsi/data/default_sre.pt) and its standard-convolution twin trained by the same recipe "
              "(default_standard.pt). If either file is not installed, both are the same seeded random "
              "initialisation (seed 0), labelled untrained with the reason.")
@pipeline_options()
@quiet_option
def robustness(
    inputs: tuple[Path, ...], out_dir: Path, angles: str, models: tuple[Path, Path] | None, pipeline: Pipeline,
    quiet: bool,
) -> None:
    """Measure how segmentations and biomarkers change when each core in INPUTS is rotated.

    For every core and angle: pad the core on a white square, rotate it, segment it with the frozen model and
    the KMeans fitted at 0°, rotate the labels back and compare with 0° on the tissue both share (pixel
    agreement, mean Dice, adjusted Rand index); biomarkers are compared with their 0° values. INPUTS are
    what `equiseg run` takes; regions are the ones `run` segments. Exit code 1 when any core failed.
    """
    from equiseg_wsi.inputs import collect_inputs
    from equiseg_wsi.robustness import default_models, parse_angles, run_experiment, weight_file_models
    from equiseg_wsi.robustness_report import summary_rows, write_robustness_outputs

    started = time.perf_counter()
    if pipeline.weights is not None:
        raise click.UsageError("robustness compares two models: give them with --models A.pth B.pth, not --weights")
    angle_list = parse_angles(angles)
    options = pipeline.options
    sources = collect_inputs(inputs, mpp=options.regions.mpp, exclude=out_dir)
    spec = pipeline.job.spec
    if models:
        tested = weight_file_models(models, layer=spec.layer, device=spec.device, batch_size=spec.batch_size,
                                    target_mpp=spec.target_mpp)
    else:
        tested = default_models(layer=spec.layer, device=spec.device, batch_size=spec.batch_size,
                                target_mpp=spec.target_mpp)
    on_core, on_seg, close_bars = progress_bars(quiet, "cores", "core", "segmentations", "seg")
    series, failures = run_experiment(sources, tested, options, angle_list, on_core=on_core, progress=on_seg)
    close_bars()
    for f in failures:
        click.echo(f"Error: {f.error}", err=True)
    write_robustness_outputs(out_dir, series, failures=failures)
    if not quiet:
        for row in summary_rows(series):
            if row["statistic"] in ("pixel_agreement", "mean_dice") or row["statistic"] == "cv:composition":
                click.echo(f"{row['model']:>10}  {row['statistic']:<16} {row['angles']:<12} mean {row['mean']:.4f}  "
                           f"worst {row['worst']:.4f}", err=True)
        n_cores = len({(s.core.identity.get('slide'), s.core.name) for s in series})
        click.echo(f"{n_cores} core(s) x {len(angle_list)} angle(s) x {len(tested)} model(s), {len(failures)} failed; "
                   f"{time.perf_counter() - started:.1f} s; outputs in {out_dir}", err=True)
    if failures:
        raise SystemExit(1)
