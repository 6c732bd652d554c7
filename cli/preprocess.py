"""`equiseg preprocess`: tissue-mask every core image of a folder and list the results in a CSV."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from tqdm import tqdm

from equiseg_wsi.cores import find_images, preprocess_core, write_preprocess_csv
from equiseg_wsi.errors import EquisegError
from equiseg_wsi.inputs import mpp_by_file
from equiseg_wsi.tissue import DEFAULT_MIN_AREA_UM2, DEFAULT_TISSUE_MPP

from .main import one_line
from .options import backend_option, mpp_option, quiet_option


@click.command()
@click.option(
    "--input-folder", "--input_folder", "input_folder", required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of core images (JPEG/PNG/TIFF/SVS/...; not searched recursively).",
)
@click.option(
    "--output-folder", "--output_folder", "output_folder", required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for <stem>_masked.<jpg|png> (background set to white) and <stem>_mask.png (0/255), both at "
    "the image's full resolution. Created if missing.",
)
@click.option(
    "--output-csv", "--output_csv", "output_csv", required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV with columns slide, core, path, mask_path, processed, mpp, tissue_fraction (one row per "
    "processed core; 'processed' is the masked image the analysis commands read).",
)
@mpp_option
@click.option(
    "--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="CSV with columns path and mpp (µm/px) for images without resolution metadata; it wins over --mpp. "
    "Default: <input-folder>/manifest.csv when it exists.",
)
@click.option(
    "--tissue-mpp", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TISSUE_MPP, show_default=True,
    help="Resolution of the tissue mask in µm/px (coarser is faster; the mask is upsampled to full size).",
)
@click.option(
    "--min-area", type=click.FloatRange(min=0), default=DEFAULT_MIN_AREA_UM2, show_default=True,
    help="Smallest tissue piece kept, in µm²; smaller pieces are removed as debris.",
)
@click.option(
    "--image-format", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True,
    help="Format of the masked image: jpg (quality 95, no chroma subsampling; ~10x smaller) or png (lossless).",
)
@backend_option
@quiet_option
def preprocess(
    input_folder: Path,
    output_folder: Path,
    output_csv: Path,
    mpp: float | None,
    manifest: Path | None,
    tissue_mpp: float,
    min_area: float,
    image_format: str,
    backend: str,
    quiet: bool,
) -> None:
    """Detect tissue in each core image of INPUT_FOLDER and write the masked image, the mask and a CSV.

    Gleason 2019 names (slideNNN_coreNNN.jpg) fill the slide and core columns; other names give slide = file
    stem and an empty core. A file that cannot be processed gets a one-line error on stderr and no CSV row;
    the others are still processed and the exit code is 1.
    """
    images = find_images(input_folder)
    if not images:
        raise EquisegError(f"{input_folder}: no slide or image files found")
    if manifest is None and os.path.lexists(input_folder / "manifest.csv"):  # a device or FIFO is refused, not skipped
        manifest = input_folder / "manifest.csv"
    mpp_by_name = mpp_by_file(manifest) if manifest is not None else {}
    rows = []
    failed = 0
    bar = tqdm(images, unit="core", disable=quiet or not sys.stderr.isatty(), file=sys.stderr)
    for path in bar:
        bar.set_postfix_str(path.name, refresh=False)
        try:
            rows.append(
                preprocess_core(
                    path, output_folder, mpp=mpp_by_name.get(path.name, mpp), backend=backend,
                    tissue_mpp=tissue_mpp, min_area_um2=min_area, image_format=image_format,
                )
            )
        except Exception as exc:  # one bad file must not stop the batch; --debug is for the group's errors
            failed += 1
            bar.clear()
            message = one_line(exc)
            click.echo(f"Error: {message if str(path) in message else f'{path}: {message}'}", err=True)
    bar.close()
    write_preprocess_csv(rows, output_csv)
    if not quiet:
        click.echo(f"{len(rows)} of {len(images)} core(s) processed; table: {output_csv}", err=True)
    if failed:
        raise SystemExit(1)
