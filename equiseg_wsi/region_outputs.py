"""One slide's regions, segmented and turned into outputs: biomarker rows, QuPath annotations, pictures.

A slide of several regions (a TMA's cores) saves each finished region in `OUT/<slide>/.equiseg-regions/`, so an
interrupted slide is resumed per region; the runner (`equiseg_wsi.runner`) removes them once the slide is complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from equiseg_wsi.biomarkers import compute_biomarkers, segment_measurements
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.errors import NoTissueError
from equiseg_wsi.export.atomic import atomic_write_text
from equiseg_wsi.export.cluster_key import exemplar_records
from equiseg_wsi.export.geojson import cluster_color, cluster_names, object_id, qupath_feature
from equiseg_wsi.export.overlay import label_image, render_overlay, save_png
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import RunOptions
from equiseg_wsi.polygons import GridPlacement, label_map_to_polygons, tissue_outline
from equiseg_wsi.progress import ProgressCallback
from equiseg_wsi.regions import Failures, RegionArea, SlideRegions
from equiseg_wsi.segment import FeatureCache, RegionSegmentation, segment_region
from equiseg_wsi.slide import Slide
from equiseg_wsi.slide_result import SlideResult
from equiseg_wsi.tile_features import Extractor

REGION_RECORDS = ".equiseg-regions"  # in a slide's folder: its finished regions, until the slide is complete
OVERLAY_MAX_SIDE = 1600  # px; overlays of large regions are drawn at a coarser resolution


def json_default(obj: Any) -> Any:
    """JSON for NumPy scalars and paths (records, the manifest)."""
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@dataclass
class SlideOutputs:
    annotations: list[dict[str, Any]] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)


@dataclass
class _RegionPart:
    """One region's share of its slide's outputs; saved as it is finished, so an interrupted slide of many
    regions (a TMA) is resumed per region (see `REGION_RECORDS`)."""

    region: str
    warnings: list[str] = field(default_factory=list)
    row: dict[str, Any] | None = None  # the biomarker row; None when the region failed
    tissue_area_mm2: float = 0.0
    annotations: list[dict[str, Any]] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)  # file names in the slide's folder
    error: str | None = None
    run_key: dict[str, str] = field(default_factory=dict)
    exemplars: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, when it was computed (not for resumes)


def _region_record(folder: Path, region: str) -> Path:
    return folder / REGION_RECORDS / f"{region}.json"


def _load_region_part(folder: Path, region: str, key: dict[str, str]) -> _RegionPart | None:
    """A region finished by an interrupted run with the same run key, its pictures still there; else None."""
    try:
        part = _RegionPart(**json.loads(_region_record(folder, region).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if part.region != region or part.run_key != key or not all((folder / p).is_file() for p in part.pictures):
        return None
    return part


def save_region_part(folder: Path, part: _RegionPart) -> None:
    # the fields as they are: `asdict` deep-copies every coordinate list (4 s of a 28 s two-region slide)
    record = {f.name: getattr(part, f.name) for f in fields(part)}
    text = json.dumps(record, separators=(",", ":"), default=json_default) + "\n"
    atomic_write_text(_region_record(folder, part.region), text, fsync=False)


# Computes the parts of the named regions of a slide elsewhere (a distributed run's workers) and saves each
# (`REGION_RECORDS`) before the slide is assembled from them: (what was found, region names, the run key).
RegionMapper = Callable[[SlideRegions, list[str], dict[str, str]], None]


def segment_regions(
    slide: Slide, source: SlideSource, found: SlideRegions, folder: Path, extractor: Extractor,
    options: RunOptions, model: ClusterModel | None, progress: ProgressCallback, result: SlideResult,
    scratch: Path, cache: FeatureCache | None = None, elsewhere: RegionMapper | None = None,
) -> SlideOutputs:
    """Segment each region; a region that fails (e.g. too little tissue for K clusters) is recorded and the
    slide's other regions go on. Raises when no region could be segmented.

    A slide of several regions saves each finished region (`REGION_RECORDS`); a rerun after an interruption
    takes the regions finished with the same run key from there (not with `overwrite`) and redoes the rest.
    `elsewhere`, for a slide of several regions, computes the regions still to do in parallel first (each
    saved like a finished region); any it did not save are computed here."""
    out = SlideOutputs()
    failures = Failures()
    per_region = len(found.areas) > 1
    resumed: dict[str, _RegionPart] = {}  # finished by an interrupted run (read once, here or in the loop)
    fresh: set[str] = set()  # regions whose saved part was made in this run (by `elsewhere`)
    if per_region and elsewhere is not None:
        if not options.overwrite:
            resumed = {a.name: p for a in found.areas
                       if (p := _load_region_part(folder, a.name, result.run_key)) is not None}
        fresh = {a.name for a in found.areas} - resumed.keys()
        if fresh:
            elsewhere(found, sorted(fresh), result.run_key)
    t_segment = 0.0
    for area in found.areas:
        part = resumed.pop(area.name, None)
        if part is None and per_region and (area.name in fresh or not options.overwrite):
            part = _load_region_part(folder, area.name, result.run_key)
        timed = area.name in fresh  # a resumed part's seconds belong to the run that made it
        if part is None:
            part = region_part(slide, source, found, area, folder, extractor, options, model, progress,
                               result.run_key, scratch, cache)
            timed = True
            if per_region:
                save_region_part(folder, part)
        if timed:
            for stage, secs in part.seconds.items():
                result.seconds[stage] = round(result.seconds.get(stage, 0.0) + secs, 3)
            t_segment += part.seconds.get("segment", 0.0)
        if part.error is not None:
            failures.add(source.name, area.name, part.error)
        result.warnings.extend(part.warnings)
        if part.row is not None:
            result.regions.append(part.row)
            result.tissue_area_mm2 += part.tissue_area_mm2
            out.annotations.extend(part.annotations)
            out.pictures.extend(folder / p for p in part.pictures)
            result.exemplars.extend(part.exemplars)
    result.failed_regions = {f.region: f.error for f in failures}
    if not result.regions:
        reasons = "; ".join(f"{f.region}: {f.error}" for f in failures)
        raise NoTissueError(f"{source.path}: no region could be segmented ({reasons})")
    result.seconds["segment"] = round(t_segment, 3)
    return out


def region_part(
    slide: Slide, source: SlideSource, found: SlideRegions, area: RegionArea, folder: Path, extractor: Extractor,
    options: RunOptions, model: ClusterModel | None, progress: ProgressCallback, run_key: dict[str, str],
    scratch: Path, cache: FeatureCache | None = None,
) -> _RegionPart:
    """One region segmented, its pictures written and the rest of its outputs (row, annotations) returned; an
    `EquisegError` becomes the part's error. Its seconds per stage are kept with it."""
    k = model.k if model is not None else options.segment.n_clusters
    offset = slide.bounds_offset if options.apply_bounds_offset else (0, 0)
    failures = Failures()
    part = _RegionPart(area.name, run_key=run_key)
    t1 = time.perf_counter()
    with failures.catch(source.name, area.name):
        seg = segment_region(slide, area, extractor, options.segment, model=model, progress=progress,
                             scratch_dir=scratch, cache=cache)
        part.seconds = {**seg.seconds, "segment": time.perf_counter() - t1}
        t1 = time.perf_counter()
        part.warnings = list(seg.warnings)
        coverage = seg.coverage()
        part.row = compute_biomarkers(seg.labels, seg.rgb, k, seg.cell_um,
                                      region_identity(source, found, area.name, options), coverage)
        part.tissue_area_mm2 = float(coverage[seg.labels > 0].sum()) * seg.cell_um**2 / 1e6
        names = cluster_names(k, options.cluster_names)
        part.annotations = _region_annotations(source, seg, names, offset, options.simplify_cells)
        pictures = _region_pictures(slide, folder, seg, names, options.segment.target_mpp)
        part.pictures = [p.name for p in pictures]
        part.exemplars = exemplar_records(area.name, seg.exemplars, slide.mpp)
        part.seconds["export"] = time.perf_counter() - t1
    if part.row is None:
        part.error = next(f.error for f in failures if f.region == area.name)
    return part


def region_identity(source: SlideSource, found: SlideRegions, region: str, options: RunOptions) -> dict[str, Any]:
    """The biomarker row's identity columns."""
    identity: dict[str, Any] = {"slide": source.slide, "region": region, "source_path": str(source.path),
                                "case_id": source.case_id}
    if found.grid is not None:  # 1-based like the cores CSV
        core = found.grid.core(region)
        identity.update(grid_row=core.row + 1, grid_column=core.col + 1,
                        case_id=options.case_ids.get(region, source.case_id))
    return identity


def _region_annotations(
    source: SlideSource, seg: RegionSegmentation, names: Sequence[str], offset: tuple[int, int], simplify_cells: float
) -> list[dict[str, Any]]:
    """QuPath annotations: the region outline, then one classified MultiPolygon per cluster."""
    placement = GridPlacement(seg.x0 - offset[0], seg.y0 - offset[1], seg.cell_level0)
    clip = None if seg.clip is None else (seg.clip[0] - offset[0], seg.clip[1] - offset[1],
                                          seg.clip[2] - offset[0], seg.clip[3] - offset[1])
    polygons = label_map_to_polygons(seg.labels, placement, simplify_cells, clip=clip)
    outline = tissue_outline(seg.labels, placement, simplify_cells, polygons=polygons, clip=clip)
    coverage = seg.coverage()
    measurements = segment_measurements(seg.labels, len(names), seg.cell_um, coverage)
    tissue_um2 = float(coverage[seg.labels > 0].sum()) * seg.cell_um**2
    meta = {"slide": source.slide, "region": seg.name, "source": source.path.name}
    out = [qupath_feature(
        outline, object_id=object_id(source.name, seg.name), name=seg.name,
        measurements={"Tissue area µm^2": tissue_um2}, metadata=meta, locked=True, on_grid=True,
    )]
    for cluster, geom in polygons.items():
        m = measurements[cluster]
        out.append(qupath_feature(
            geom, object_id=object_id(source.name, seg.name, cluster), name=f"{seg.name} {names[cluster - 1]}",
            class_name=names[cluster - 1], color=cluster_color(cluster - 1),
            measurements={"Area µm^2": m["area_um2"], "Fraction of region": m["fraction_of_region"],
                          "Components": m["n_components"]},
            metadata={**meta, "cluster": str(cluster)}, on_grid=True,  # from polygons.snap_valid
        ))
    return out


def label_map_placement(seg: RegionSegmentation) -> dict[str, str]:
    """Where a label PNG lies on the slide (its tEXt chunks): label pixel (r, c) covers level-0 px
    [x0 + c*cell, x0 + (c+1)*cell) x [y0 + r*cell, y0 + (r+1)*cell) of the slide as read (before any OpenSlide
    bounds offset), and one pixel is cell_um µm wide."""
    return {"equiseg:x0_level0": repr(float(seg.x0)), "equiseg:y0_level0": repr(float(seg.y0)),
            "equiseg:cell_level0": repr(float(seg.cell_level0)), "equiseg:cell_um": repr(float(seg.cell_um))}


def _region_pictures(slide: Slide, folder: Path, seg: RegionSegmentation, names: Sequence[str], target_mpp: float
                     ) -> list[Path]:
    """Overlay PNG (tissue + translucent segments + legend) and the label map as a palette PNG.

    The overlay is never finer than the pixels the network saw (`target_mpp`): those are decoded already, for
    the refinement, and a finer picture shows no more of the segmentation."""
    colors = [cluster_color(i) for i in range(len(names))]
    h, w = seg.labels.shape
    extent = max(h, w) * seg.cell_level0 * slide.mpp  # µm
    mpp = max(extent / OVERLAY_MAX_SIDE, seg.cell_um / 8, target_mpp, slide.mpp)  # never finer than the scan
    scale = mpp / slide.mpp
    width = max(1, round(w * seg.cell_level0 / scale))
    height = max(1, round(h * seg.cell_level0 / scale))
    rgb = slide.read_region(seg.x0, seg.y0, width, height, mpp)
    overlay = folder / f"{seg.name}_overlay.png"
    save_png(overlay, render_overlay(rgb, seg.labels, colors, names, title=seg.name))
    labels = folder / f"{seg.name}_labels.png"
    save_png(labels, label_image(seg.labels, colors), text=label_map_placement(seg))
    return [overlay, labels]


