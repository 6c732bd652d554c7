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

from equiseg_cli.options import (
    backend_option,
    feature_options,
    min_area_option,
    mpp_option,
    progress_bars,
    quiet_option,
    region_options,
    run_options,
)
from equiseg_wsi.robustness import DEFAULT_ANGLES

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
                     "packaged default SRE-ResNet-18 (docs/model_card.md)."),
        click.option("--angles", default=DEFAULT_ANGLES, show_default=True,
                     help="Angles of the rotation series in degrees: start:stop:step (stop excluded) or a list "
                     "such as 0,90,180. 0 is always included."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in (quiet_option, min_area_option, region_options, backend_option, mpp_option, feature_options):
        func = decorator(func)
    return func


def _setup(kw: dict[str, Any]) -> tuple[Any, dict[str, Any], Any, list[float]]:
    """Extractor, identity, RunOptions and angles from the parsed options (shared by intra and inter)."""
    from equiseg_wsi.features import build_extractor
    from equiseg_wsi.robustness import parse_angles

    if kw["weight_path"] is not None and kw["weights"] is not None:
        raise click.UsageError("give the model once: --weight_path or --weights")
    angles = parse_angles(kw["angles"])
    extractor, identity = build_extractor(kw["weight_path"] or kw["weights"], layer=kw["layer"],
                                          device=kw["device"], batch_size=kw["batch_size"],
                                          target_mpp=kw["target_mpp"])
    options = run_options(
        n_clusters=kw["n_clusters"], n_samples=kw["n_samples"], seed=kw["seed"],
        target_mpp=kw["target_mpp"], halo=kw["halo"], tile_size=kw["tile_size"], min_area=kw["min_area"],
        mpp=kw["mpp"], backend=kw["backend"], tissue_mpp=kw["tissue_mpp"], min_tissue_area=kw["min_tissue_area"],
        tma=kw["tma"], core_diameter=kw["core_diameter"],
    )
    return extractor, identity, replace(options, overwrite=True), angles


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
def intra(**kw: Any) -> None:
    """Intra-subject analysis (the original `intra_subject.py`): KMeans fitted on each core by itself.

    Runs `equiseg run` on the CSV's cores and writes, per core, the rotation series: the core rotated by
    each angle, segmented with the KMeans fitted at 0° and rotated back (rotation/<slide>_<core>.png, one
    row per angle in rotation.csv). Exit code 1 when any core failed.
    """
    from equiseg_wsi.cohort import intra_subject
    from equiseg_wsi.inputs import collect_inputs

    started = time.perf_counter()
    out_dir: Path = kw["output_path"]
    sources = collect_inputs([kw["csv_path"]], mpp=kw["mpp"], exclude=out_dir)
    extractor, identity, options, angles = _setup(kw)
    on_region, on_tiles, close = progress_bars(kw["quiet"], "intra")
    try:
        result = intra_subject(sources, extractor, identity, options, out_dir, angles,
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
def inter(**kw: Any) -> None:
    """Inter-subject analysis (the original `inter_subject.py`), fitted on EVERY training core.

    Fits one KMeans on --n_samples cells from each training core (`equiseg fit`; saved as
    OUT/kmeans_model.npz), applies it to the test cores (`equiseg run --kmeans-model`), and writes each
    test core's rotation series with that model. Exit code 1 when any core failed.
    """
    from equiseg_wsi.cohort import inter_subject, split_by_slide
    from equiseg_wsi.inputs import collect_inputs

    started = time.perf_counter()
    out_dir: Path = kw["output_path"]
    train = collect_inputs([kw["csv_path"]], mpp=kw["mpp"], exclude=out_dir)
    if kw["test_data_path"] is not None:
        test = collect_inputs([kw["test_data_path"]], mpp=kw["mpp"], exclude=out_dir)
    else:
        train, test = split_by_slide(train)
    extractor, identity, options, angles = _setup(kw)
    on_region, on_tiles, close = progress_bars(kw["quiet"], "inter")
    try:
        result = inter_subject(train, test, extractor, identity, options, out_dir, angles,
                               on_slide=lambda i, s: on_region(s.name), on_region=on_region, progress=on_tiles)
    finally:
        close()
    if not kw["quiet"] and result.model is not None:
        click.echo(f"KMeans (K={result.model.k}) fitted on {len(result.model.sources)} training region(s); "
                   f"applied to {len(test)} test core image(s)", err=True)
    _finish(result, out_dir, started, kw["quiet"], "inter")
