"""Options shared by several commands, defined once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", "tiffslide", "openslide", "image"]),
    default="auto",
    show_default=True,
    help="Slide reader. auto tries tiffslide, then openslide, then a plain-image reader (Pillow/tifffile).",
)

mpp_option = click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Resolution in µm/px to use for files whose metadata has none (e.g. plain JPEG cores). "
    "Default: take it from the file, and fail that file if it has none.",
)

quiet_option = click.option(
    "-q",
    "--quiet",
    is_flag=True,
    default=False,
    help="No progress bar and no summary line (errors are still shown). The bar is also off when stderr "
    "is not a terminal.",
)


def feature_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that decide the features (shared by run, fit and robustness)."""
    options = [
        click.option(
            "--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
            help="Model weights: an equiseg weights file or a reference SRE-Conv checkpoint (.pth). Default: the "
            "packaged default model (a documented seeded random initialisation until a trained one ships).",
        ),
        click.option(
            "--target-mpp", type=click.FloatRange(min=0, min_open=True), default=2.5, show_default=True,
            help="Resolution the model sees, in µm/px (2.5 ≈ the paper's 5,000 px cores at 0.25 µm/px resized "
            "to 512 px). One feature cell is 8 px, i.e. 20 µm at 2.5 µm/px.",
        ),
        click.option(
            "--layer", default="layer4", show_default=True,
            help="Feature layer: layer1..layer4, or several joined with '+' (e.g. layer3+layer4), upsampled to "
            "the finest stride among them.",
        ),
        click.option(
            "--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
            help="Where the CNN runs; auto picks CUDA, then MPS, then CPU.",
        ),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=None,
            help="Tiles per forward pass. Default: 1 on CPU (batching does not speed it up, and memory stays that "
            "of one tile), 16 on a GPU.",
        ),
        click.option(
            "--halo", type=click.IntRange(min=0), default=None,
            help="Context margin read around each tile, in px at --target-mpp (multiple of 8). Default: 96, with "
            "which tile-by-tile features equal whole-image features within 1e-5 (measured); 64 is ~30% faster "
            "with 1e-3 differences.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func
