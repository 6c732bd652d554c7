"""Options shared by several commands, defined once, with their defaults taken from the library's option
dataclasses; `pipeline_options` turns them into one validated `Pipeline` before the command body runs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from equiseg_wsi.errors import InputError
from equiseg_wsi.models.arch import DEFAULT_LAYER
from equiseg_wsi.options import (
    GLASS_MODES,
    REFINE_MODES,
    ExtractorSpec,
    RegionOptions,
    RunJob,
    RunOptions,
    SegmentOptions,
)
from equiseg_wsi.slide import BACKENDS

_SEG = SegmentOptions()
_REG = RegionOptions()

backend_option = click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default=_REG.backend,
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
    help="No progress and no summary line (errors and warnings are still shown). On a terminal progress is a "
    "bar; when stderr is a file or pipe (2>log, batch jobs) it is timestamped lines: one per slide (or core) "
    "and at least one a minute.",
)


class WeightsParam(click.ParamType):  # type: ignore[type-arg]  # generic only from click 8.2
    """An existing weights file, or the word 'random' (the seeded random initialisation)."""

    name = "PATH|random"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, str) and value == "random":
            return value
        path: Path = click.Path(exists=True, dir_okay=False, path_type=Path).convert(value, param, ctx)
        return path


_FEATURE_OPTIONS = [
    click.option(
        "--weights", type=WeightsParam(), default=None,
        help="Model weights: an equiseg weights file, a reference SRE-Conv checkpoint (.pth), or 'random' "
        "for the seeded random initialisation (seed 0). Default: the packaged compact SRE-ResNet (128 "
        "channels per cell), trained on colon gland masks (EBHI-Seg development cases; docs/model_card.md).",
    ),
    click.option(
        "--target-mpp", type=click.FloatRange(min=0, min_open=True), default=_SEG.target_mpp, show_default=True,
        help="Resolution the model sees, in µm/px (the packaged model was trained at about 1; 2.5 is the paper's "
        "setting, 5,000 px cores at 0.25 µm/px resized to 512 px, about 6x faster and coarser). One feature cell "
        "is 8 px with layer4 (8 µm at 1 µm/px), 4 px with layer3, 2 px with layer2.",
    ),
    click.option(
        "--layer", default=DEFAULT_LAYER, show_default=True,
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
        help="Context margin read around each tile, in px at --target-mpp (a multiple of the feature cell). "
        "Default: the model's receptive field rounded up to the cell, at most 96 (56 px for the packaged "
        "model, 96 for the published SRE-ResNet-18 widths), with which tile-by-tile features equal whole-image "
        "features within 1e-5 (measured).",
    ),
]

_CLUSTERING_OPTIONS = [
    click.option("--n-clusters", type=click.IntRange(2, 20), default=_SEG.n_clusters, show_default=True,
                 help="K, the number of KMeans clusters (segments)."),
    click.option("--n-samples", type=click.IntRange(min=10), default=_SEG.n_samples, show_default=True,
                 help="Tissue positions (feature cells) sampled per core/region to fit KMeans."),
    click.option("--seed", type=int, default=_SEG.seed, show_default=True,
                 help="Seed of the tissue-position sampling and of KMeans."),
]

_GLASS_OPTION = click.option(
    "--glass", type=click.Choice(list(GLASS_MODES)), default=_SEG.glass, show_default=True,
    help="What the network sees outside the tissue (slide glass, and beyond the image edge): keep = as scanned "
    "(white); fill = a smooth extension of the nearby tissue colours, so cells at a tissue edge are described by "
    "their tissue and not by the glass next to it. Cell colours and biomarkers always use the scanned pixels.",
)

_REFINE_OPTION = click.option(
    "--refine", type=click.Choice(list(REFINE_MODES)), default=_SEG.refine, show_default=True,
    help="Segment borders: none = the feature-cell grid (8 px at --target-mpp with layer4); colour = moved onto "
    "the image's own edges on a grid of at most 2 µm per pixel (label PNGs, GeoJSON and areas then use that grid).",
)

_REGION_OPTIONS = [
    click.option("--tile-size", type=click.IntRange(min=64), default=_SEG.tile_size, show_default=True,
                 help="Largest tile interior in pixels at --target-mpp (a multiple of the feature cell, 8 px with "
                 "layer4); a larger region is split into equal tiles no larger than this. Larger tiles run faster "
                 "on a CPU (a 1,536 px tile needs about 0.7 GB) but need more memory."),
    click.option("--tissue-mpp", type=click.FloatRange(min=0, min_open=True), default=_REG.tissue_mpp,
                 show_default=True, help="Resolution of the tissue mask, in µm/px."),
    click.option("--min-tissue-area", type=click.FloatRange(min=0), default=_REG.min_tissue_area_um2,
                 show_default=True,
                 help="Smallest tissue piece processed as a region of a whole slide, in µm² (debris is ignored)."),
    click.option("--tma/--no-tma", default=None,
                 help="Treat whole slides as TMAs (one region per core, named like QuPath, A-1) or never. "
                 "Default: detect TMA slides automatically."),
    click.option("--core-diameter", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="TMA core diameter in µm. Default: estimated from the slide."),
    mpp_option,
    backend_option,
]

_MIN_AREA_OPTION = click.option(
    "--min-area", type=click.FloatRange(min=0), default=_SEG.min_segment_um2, show_default=True,
    help="Smallest segment kept, in µm²; smaller pieces join the neighbouring segment.",
)

_SHARED_NAMES = ("weights", "target_mpp", "layer", "device", "batch_size", "halo", "n_clusters", "n_samples",
                 "seed", "tile_size", "tissue_mpp", "min_tissue_area", "tma", "core_diameter", "mpp", "backend",
                 "min_area", "glass", "refine")


@dataclass(frozen=True)
class Pipeline:
    """What the shared options describe: the validated job, plus the raw weights choice for messages."""

    job: RunJob
    weights: Path | str | None

    @property
    def options(self) -> RunOptions:
        return self.job.options

    def with_options(self, **changes: Any) -> Pipeline:
        """The same pipeline with other top-level `RunOptions` fields (e.g. overwrite, case ids)."""
        return replace(self, job=replace(self.job, options=replace(self.job.options, **changes)))


def _pipeline(values: dict[str, Any]) -> Pipeline:
    weights = values.get("weights")
    segment = SegmentOptions(
        n_clusters=values.get("n_clusters", _SEG.n_clusters), n_samples=values.get("n_samples", _SEG.n_samples),
        seed=values.get("seed", _SEG.seed), target_mpp=values["target_mpp"], tile_size=values["tile_size"],
        halo=values["halo"], min_segment_um2=values.get("min_area", _SEG.min_segment_um2), glass=values["glass"],
        refine=values["refine"],
    )
    regions = RegionOptions(
        backend=values["backend"], mpp=values["mpp"], tissue_mpp=values["tissue_mpp"],
        min_tissue_area_um2=values["min_tissue_area"], tma=values["tma"], core_diameter_um=values["core_diameter"],
    )
    spec = ExtractorSpec(None if weights is None else str(weights), values["layer"], values["device"],
                         values["batch_size"], values["target_mpp"])
    job = RunJob(spec, RunOptions(segment=segment, regions=regions))
    job.check()
    return Pipeline(job, weights)


def pipeline_options(*, clustering: bool = True, min_area: bool = True) -> Callable[[Callable[..., Any]],
                                                                                   Callable[..., Any]]:
    """Add the feature, region (and clustering, min-area) options to a command; the command receives them as
    one `pipeline: Pipeline`, validated before any model is loaded (a bad value fails in one line, exit 2)."""
    decorators = [*_FEATURE_OPTIONS, *(_CLUSTERING_OPTIONS if clustering else []), *_REGION_OPTIONS,
                  _GLASS_OPTION, _REFINE_OPTION, *([_MIN_AREA_OPTION] if min_area else [])]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def command(**kw: Any) -> Any:
            values = {name: kw.pop(name) for name in _SHARED_NAMES if name in kw}
            try:
                pipeline = _pipeline({**kw, **values})
            except InputError as exc:
                click.echo(f"Error: {exc}", err=True)
                raise SystemExit(2) from None
            return func(pipeline=pipeline, **kw)

        for option in reversed(decorators):
            command = option(command)
        return command

    return decorate


def progress_bars(
    quiet: bool, what: str, unit: str = "region", inner_what: str = "tiles", inner_unit: str = "tile"
) -> tuple[Callable[[str], None], Callable[[int, int, str], None], Callable[[], None]]:
    """Progress of a command that learns its regions one by one: bars on a terminal (one per core/region, one for
    its work), otherwise a log line per region and at least one a minute; nothing with --quiet."""
    from .progress import Progress

    bars = Progress(None, quiet=quiet, item=unit, inner=inner_what, line_at_start=True, desc=what,
                    inner_unit=inner_unit)
    seen: list[str] = []

    def on_region(name: str) -> None:
        if seen:
            bars.finish(len(seen) - 1, seen[-1], None)
        seen.append(name)
        bars.start(len(seen) - 1, name)

    def on_tiles(done: int, total: int, unit: str) -> None:
        bars.units(done, total, unit or inner_what)

    def close() -> None:
        if seen:
            bars.finish(len(seen) - 1, seen[-1], None)
        bars.close()

    return on_region, on_tiles, close
