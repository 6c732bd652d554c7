"""The regions every command works on, found one way: a core image is one region, a TMA slide one region per
present core, any other slide one region per tissue piece; and one failure record for whatever goes wrong.

`each_region` is the shared loop of `run`, `fit`, `robustness`, `intra` and `inter`: it opens each slide, finds
its regions and yields them; a slide that cannot be opened or has no tissue becomes a `RegionFailure` and the
loop goes on. Callers wrap their per-region work in `failures.catch(...)` so one bad region never stops a batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from equiseg_wsi.errors import EquisegError, InputError, NoTissueError, one_line
from equiseg_wsi.export.atomic import atomic_path
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import RegionOptions
from equiseg_wsi.slide import Slide, open_slide
from equiseg_wsi.tissue import TissueMap, TissueRegion, detect_tissue
from equiseg_wsi.tma import TmaGrid, dearray, is_tma

__all__ = [
    "Failures",
    "RegionArea",
    "RegionFailure",
    "RegionItem",
    "SlideRegions",
    "core_areas",
    "each_region",
    "open_regions",
    "region_areas",
    "regions_of",
    "slide_regions",
]


@dataclass
class RegionArea:
    """A region to segment: its name, level-0 rectangle and tissue mask (at the tissue map's resolution)."""

    name: str
    rect_level0: tuple[float, float, float, float]
    tissue: TissueMap  # mask restricted to this region, same geometry as the slide's tissue map


@dataclass
class SlideRegions:
    """What `slide_regions` found: the slide's tissue map, its TMA grid (None unless dearrayed) and the regions."""

    tissue: TissueMap
    grid: TmaGrid | None
    areas: list[RegionArea]


@dataclass(frozen=True)
class RegionFailure:
    """A slide (region '') or one of its regions that could not be processed, with a one-line reason."""

    slide: str
    region: str
    error: str


@dataclass
class Failures:
    """The failures of a batch, in the order they happened."""

    items: list[RegionFailure] = field(default_factory=list)

    def add(self, slide: str, region: str, error: str) -> None:
        self.items.append(RegionFailure(slide, region, error))

    @contextmanager
    def catch(self, slide: str, region: str = "") -> Iterator[None]:
        """Record an `EquisegError` raised in the block as this slide's/region's failure instead of raising."""
        try:
            yield
        except EquisegError as exc:
            self.add(slide, region, one_line(exc))

    def __iter__(self) -> Iterator[RegionFailure]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def region_areas(tissue: TissueMap, as_one_core: bool, core_name: str, min_region_um2: float = 0.0) -> list[RegionArea]:
    """A core image is one region (all its tissue); a slide without a TMA grid is one region per tissue piece
    of at least `min_region_um2` µm²."""
    if as_one_core:
        rows, cols = np.nonzero(tissue.mask)
        if rows.size == 0:
            return []
        px = tissue.px_level0
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        rect = (float(c0 * px), float(r0 * px), float((c1 - c0) * px), float((r1 - r0) * px))
        return [RegionArea(core_name, rect, tissue)]
    return [RegionArea(r.name, r.bbox_level0, _only(tissue, r)) for r in tissue.regions if r.area_um2 >= min_region_um2]


def _only(tissue: TissueMap, region: TissueRegion) -> TissueMap:
    """The slide's tissue map with every other tissue piece removed (same geometry)."""
    mask = np.zeros_like(tissue.mask)
    c, r, w, h = region.bbox_mask
    mask[r : r + h, c : c + w] = region.mask_crop
    return TissueMap(mask=mask, mpp=tissue.mpp, px_level0=tissue.px_level0, tissue_fraction=float(mask.mean()))


def core_areas(grid: TmaGrid, tissue: TissueMap) -> list[RegionArea]:
    """One `RegionArea` per present core (row-major), named after it; its tissue map keeps only its pieces.

    `tissue` must be the map `grid` was fitted on (same mask geometry): each core keeps its pieces' pixels.
    """
    if tuple(tissue.mask.shape) != tuple(grid.mask_shape) or not math.isclose(tissue.px_level0, grid.px_level0):
        raise InputError(
            f"tissue map {tissue.mask.shape} at {tissue.px_level0:.4g} level-0 px/px is not the one the grid was "
            f"fitted on {grid.mask_shape} at {grid.px_level0:.4g}"
        )
    out = []
    for core in grid.present:
        mask = np.zeros(tissue.mask.shape, dtype=bool)
        c0, r0, w, h = core.bbox_mask
        if core.mask_crop is not None:
            mask[r0 : r0 + h, c0 : c0 + w] = core.mask_crop & np.asarray(tissue.mask[r0 : r0 + h, c0 : c0 + w], bool)
        region = TissueMap(mask=mask, mpp=tissue.mpp, px_level0=tissue.px_level0, tissue_fraction=float(mask.mean()))
        out.append(RegionArea(core.name, core.bbox_level0, region))
    return out


def slide_regions(slide: Slide, source: SlideSource, options: RegionOptions) -> SlideRegions:
    """The regions of one opened slide: a core image is one region; a TMA slide one region per present core
    (dearrayed when `options.tma` is True, or when None and the slide looks like a TMA); any other slide one
    region per tissue piece of at least `options.min_tissue_area_um2`."""
    tissue = detect_tissue(slide, options.tissue_mpp)  # debris removed; small pieces of a core image still count
    if not source.is_core and options.tma is not False and (options.tma or is_tma(tissue)):
        grid = dearray(tissue, core_diameter_um=options.core_diameter_um)
        return SlideRegions(tissue, grid, core_areas(grid, tissue))
    core_name = source.core or source.name
    return SlideRegions(tissue, None, region_areas(tissue, source.is_core, core_name, options.min_tissue_area_um2))


@contextmanager
def open_regions(source: SlideSource, options: RegionOptions, cache: Path | None = None
                 ) -> Iterator[tuple[Slide, SlideRegions]]:
    """Open `source` and find its regions; raises `NoTissueError` when it has none. With a `cache` folder (a
    run's feature cache) what was found is kept there, so the segmentation after a run-wide fit does not find
    the slide's tissue (and dearray a TMA) again."""
    with open_slide(source.path, backend=options.backend, mpp=source.mpp or options.mpp) as slide:
        found = slide_regions(slide, source, options) if cache is None else _cached_regions(slide, source, options,
                                                                                            cache)
        if not found.areas:
            raise NoTissueError(f"{source.path}: no tissue found (tissue fraction {found.tissue.tissue_fraction:.1%})")
        yield slide, found


def _cached_regions(slide: Slide, source: SlideSource, options: RegionOptions, folder: Path) -> SlideRegions:
    """`slide_regions`, read from `folder` when this run found them already (same file, source and options).

    Pickled: the run's own files in its output folder's hidden cache, removed at the end of the run."""
    try:
        st = Path(source.path).stat()
        stamp = [str(Path(source.path).resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return slide_regions(slide, source, options)
    text = json.dumps({"file": stamp, "source": asdict(source), "options": asdict(options)}, sort_keys=True,
                      default=str)
    path = folder / f"regions-{hashlib.sha256(text.encode()).hexdigest()[:32]}.pickle.z"
    try:
        found, warnings = pickle.loads(zlib.decompress(path.read_bytes()))
        if isinstance(found, SlideRegions) and isinstance(warnings, list):
            slide.checked_before(warnings)  # the glass colour check ran on the tissue search's read
            return found
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, AttributeError, ImportError, TypeError,
            ValueError):
        pass
    found = slide_regions(slide, source, options)
    # compressed: each region's tissue mask has the slide's full geometry, mostly zeros (a 10-core TMA's
    # 2.7 MB pickle is 34 kB, in 4 ms)
    data = zlib.compress(pickle.dumps((found, list(slide.warnings)), protocol=pickle.HIGHEST_PROTOCOL), 1)
    with atomic_path(path, fsync=False) as tmp:
        tmp.write_bytes(data)
    return found


@dataclass
class RegionItem:
    """One region of one opened slide, as `each_region` yields it (the slide is open only until the next one)."""

    source: SlideSource
    slide: Slide
    found: SlideRegions
    area: RegionArea

    @property
    def key(self) -> str:
        """`slide/region`: the region's name within a run (what cohort models record)."""
        return f"{self.source.name}/{self.area.name}"


def each_region(
    sources: Sequence[SlideSource],
    options: RegionOptions,
    failures: Failures,
    *,
    on_region: Callable[[str], None] | None = None,
    cache: Path | None = None,
) -> Iterator[RegionItem]:
    """Every region of every source, in input order; slides that fail to open or have no tissue are recorded
    in `failures` (region '') and skipped. `cache`: see `open_regions`."""
    for source in sources:
        with regions_of(source, options, failures, cache=cache) as items:
            for item in items:
                if on_region is not None:
                    on_region(item.key)
                yield item


@contextmanager
def regions_of(source: SlideSource, options: RegionOptions, failures: Failures, *, cache: Path | None = None
               ) -> Iterator[list[RegionItem]]:
    """The regions of one source, its slide open for the whole block (so they can be worked on at once); none
    when the slide fails to open or has no tissue (recorded in `failures`, region ''). `cache`: see
    `open_regions`. Errors raised in the block are not caught."""
    with ExitStack() as stack:
        try:
            slide, found = stack.enter_context(open_regions(source, options, cache))
        except EquisegError as exc:
            failures.add(source.name, "", one_line(exc))
            yield []
            return
        yield [RegionItem(source, slide, found, area) for area in found.areas]
