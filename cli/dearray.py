"""`equiseg dearray`: find the cores of a TMA slide, fit their grid, name them like QuPath, hand QuPath the grid."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import click

from equiseg_wsi.errors import EquisegError
from equiseg_wsi.export.tma_outputs import export_dearray
from equiseg_wsi.inputs import read_case_ids
from equiseg_wsi.slide import open_slide
from equiseg_wsi.tissue import DEFAULT_TISSUE_MPP
from equiseg_wsi.tma import NotTmaError, TmaGrid, dearray_slide

from .options import backend_option, mpp_option, quiet_option


@click.command()
@click.argument("slide", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (created if missing) for <slide>.qptma, <slide>_cores.geojson, <slide>_cores.csv and "
    "<slide>_grid.png.",
)
@click.option(
    "--core-diameter", type=click.FloatRange(min=0, min_open=True), default=None,
    help="Core (punch) diameter in µm, e.g. 600 or 1000. Default: estimated from the tissue pieces.",
)
@click.option(
    "--row-labels", default=None, metavar="SPEC",
    help="Row labels, top to bottom: a range such as A-H or 1-8, or a comma list. Default: A, B, C, ... "
    "(AA, AB, ... after Z).",
)
@click.option(
    "--col-labels", default=None, metavar="SPEC",
    help="Column labels, left to right: a range such as 1-12 or A-L, or a comma list. Default: 1, 2, 3, ...",
)
@click.option(
    "--row-first/--column-first", default=True, show_default=True,
    help="Core names with the row label first (A-1, QuPath's default) or the column label first (1-A).",
)
@click.option(
    "--tissue-mpp", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TISSUE_MPP, show_default=True,
    help="Resolution of the tissue mask the grid is fitted on, in µm/px (coarser is faster; keep a core at "
    "least ~30 px across, e.g. <= 16 for 0.6 mm cores).",
)
@backend_option
@mpp_option
@click.option(
    "--case-ids", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="CSV mapping core name to case id (header with e.g. 'core' and 'case_id', or two plain columns). The ids "
    "go to the 'Case ID' column of the .qptma (the one QuPath reads) and the case_id column of the cores CSV. "
    "Default: no case ids.",
)
@click.option(
    "--tma", "force_tma", is_flag=True, default=False,
    help="Dearray the slide even if it does not look like a TMA (then a warning says why). Default: such a "
    "slide fails with a one-line error naming the reason.",
)
@quiet_option
def dearray(
    slide: Path,
    output: Path,
    core_diameter: float | None,
    row_labels: str | None,
    col_labels: str | None,
    row_first: bool,
    tissue_mpp: float,
    backend: str,
    mpp: float | None,
    case_ids: Path | None,
    force_tma: bool,
    quiet: bool,
) -> None:
    """Dearray the TMA slide SLIDE: find its cores, fit the grid and name the cores like QuPath (A-1, ...).

    Writes, in the output folder: <slide>.qptma (QuPath's TMA grid: drag it onto the image in QuPath),
    <slide>_cores.geojson (core outlines as annotations named after the cores; missing positions have the class
    'TMA core missing'), <slide>_cores.csv (one row per grid position: name, 1-based row and column, present,
    level-0 bounding box and centre in px, diameter in µm, case id) and <slide>_grid.png (overview with the grid;
    missing positions dashed red). Coordinates are level-0 pixels of the slide.

    A slide that does not look like a TMA (fewer than 4 round, core-sized pieces on a grid, e.g. one tissue
    section) fails with one line saying why; --tma dearrays it anyway, with a warning.
    """
    started = time.perf_counter()
    ids = read_case_ids(case_ids) if case_ids is not None else None
    try:
        with open_slide(slide, backend=backend, mpp=mpp) as opened:
            grid, _ = dearray_slide(
                opened, tissue_mpp, core_diameter_um=core_diameter, row_labels=row_labels, col_labels=col_labels,
                row_first=row_first, require_tma=not force_tma,
            )
            paths = export_dearray(grid, opened, output, case_ids=ids)
    except NotTmaError as exc:
        raise NotTmaError(f"{slide}: {exc}; pass --tma to dearray it anyway") from exc
    except EquisegError as exc:  # name the slide in the one-line message
        if str(slide) in str(exc):
            raise
        raise type(exc)(f"{slide}: {exc}") from exc
    if ids:
        _warn_unknown_cores(case_ids, ids, grid)
    if not quiet:
        _echo_summary(slide, grid, time.perf_counter() - started, paths["qptma"].parent)


def _warn_unknown_cores(case_ids: Path | None, ids: Mapping[str, str], grid: TmaGrid) -> None:
    """Warn (stderr) about case ids whose core is not in the grid: usually a naming or labelling mismatch."""
    unknown = sorted(set(ids) - {c.name for c in grid.cores})
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        click.echo(
            f"Warning: {case_ids}: {len(unknown)} case id(s) name cores not in the grid: "
            f"{', '.join(unknown[:5])}{more}", err=True,
        )


def _echo_summary(slide: Path, grid: TmaGrid, seconds: float, folder: Path) -> None:
    """One line on stderr: grid size, cores present and missing, geometry, time and output folder."""
    n_present = len(grid.present)
    click.echo(
        f"{slide.name}: {grid.n_cols} x {grid.n_rows} grid (columns x rows), {n_present} cores present, "
        f"{len(grid.cores) - n_present} missing; rotation {grid.rotation_deg:.1f}°, spacing "
        f"{grid.spacing_um:.0f} µm, core diameter {grid.diameter_um:.0f} µm; "
        f"{seconds:.1f} s -> {folder}",
        err=True,
    )
