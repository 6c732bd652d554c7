"""Options shared by several commands, defined once."""

from __future__ import annotations

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
