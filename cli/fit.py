"""`equiseg fit`: one KMeans model fitted on tissue cells sampled from every core of a cohort.

Also home of the clustering and region options that `fit`, `robustness`, `intra` and `inter` share with `run`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


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


def region_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """How regions are found and segmented, exactly as in `run` (same option names, units and defaults)."""
    options = [
        click.option("--tile-size", type=click.IntRange(min=64), default=512, show_default=True,
                     help="Tile interior in pixels at --target-mpp (multiple of 8); larger tiles need more memory."),
        click.option("--min-area", type=click.FloatRange(min=0), default=2000.0, show_default=True,
                     help="Smallest segment kept, in µm²; smaller pieces join the neighbouring segment."),
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
