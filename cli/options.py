"""Options shared by several commands, defined once."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

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


class WeightsParam(click.ParamType):
    """An existing weights file, or the word 'random' (the seeded random initialisation)."""

    name = "PATH|random"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, str) and value == "random":
            return value
        return click.Path(exists=True, dir_okay=False, path_type=Path).convert(value, param, ctx)


def feature_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that decide the features (shared by run, fit and robustness)."""
    options = [
        click.option(
            "--weights", type=WeightsParam(), default=None,
            help="Model weights: an equiseg weights file, a reference SRE-Conv checkpoint (.pth), or 'random' "
            "for the seeded random initialisation (seed 0). Default: the packaged SRE-ResNet-18, self-supervised "
            "on CC0 H&E (docs/model_card.md).",
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


min_area_option = click.option(
    "--min-area", type=click.FloatRange(min=0), default=2000.0, show_default=True,
    help="Smallest segment kept, in µm²; smaller pieces join the neighbouring segment.",
)


def region_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """How regions are found and segmented, exactly as in `run` (same option names, units and defaults)."""
    options = [
        click.option("--tile-size", type=click.IntRange(min=64), default=512, show_default=True,
                     help="Tile interior in pixels at --target-mpp (multiple of 8); larger tiles need more memory."),
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


def progress_bars(
    quiet: bool, what: str, unit: str = "region", inner_what: str = "tiles", inner_unit: str = "tile"
) -> tuple[Callable[[str], None], Callable[[int, int, str], None], Callable[[], None]]:
    """tqdm bars (off with --quiet or when stderr is not a terminal): one per core/region, one for its work."""
    show = not quiet and sys.stderr.isatty()
    outer = tqdm(desc=what, unit=unit, disable=not show, position=0)
    inner = tqdm(desc=inner_what, unit=inner_unit, disable=not show, position=1, leave=False)
    seen: list[str] = []

    def on_region(name: str) -> None:
        outer.n = len(seen)
        seen.append(name)
        outer.set_postfix_str(name)
        inner.reset()

    def on_tiles(done: int, total: int, unit: str) -> None:
        inner.total = total
        inner.n = done
        inner.refresh()

    def close() -> None:
        outer.n = len(seen)
        outer.close()
        inner.close()

    return on_region, on_tiles, close


def run_options(
    *, n_clusters: int, n_samples: int, seed: int, target_mpp: float, halo: int | None,
    tile_size: int, min_area: float, mpp: float | None, backend: str, tissue_mpp: float, min_tissue_area: float,
    tma: bool | None, core_diameter: float | None,
) -> Any:
    """The RunOptions these shared options describe (the same object `run` builds)."""
    from equiseg_wsi.runner import RunOptions
    from equiseg_wsi.segment import SegmentOptions

    return RunOptions(
        segment=SegmentOptions(
            n_clusters=n_clusters, n_samples=n_samples, seed=seed, target_mpp=target_mpp, tile_size=tile_size,
            halo=halo, min_segment_um2=min_area,
        ),
        backend=backend, mpp=mpp, tissue_mpp=tissue_mpp, tissue_min_area_um2=min_tissue_area, tma=tma,
        core_diameter_um=core_diameter,
    )
