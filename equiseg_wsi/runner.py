"""One slide end to end, and many slides one after another, with a manifest that makes runs resumable.

A slide's outputs live in `OUT/<slide>/`; `OUT/<slide>/slide.json` is written last, so its presence means the
slide is complete (every other file is written atomically before it). The run-level `manifest.json` and
`biomarkers.csv` are rebuilt from those records at the end of every run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from equiseg_wsi import __version__
from equiseg_wsi.biomarkers import compute_biomarkers, segment_measurements, write_csv
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.errors import EquisegError, InputError, NoTissueError
from equiseg_wsi.export.atomic import atomic_write_text, remove_stale_temporaries
from equiseg_wsi.export.geojson import cluster_class_name, cluster_color, object_id, qupath_feature, write_geojson
from equiseg_wsi.export.overlay import label_image, render_overlay, save_png
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.polygons import GridPlacement, label_map_to_polygons, tissue_outline
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.segment import Extractor, RegionSegmentation, SegmentOptions, segment_region, slide_regions
from equiseg_wsi.slide import Slide, open_slide
from equiseg_wsi.tma import export_dearray

log = logging.getLogger(__name__)

SLIDE_RECORD = "slide.json"
OVERLAY_MAX_SIDE = 1600  # px; overlays of large regions are drawn at a coarser resolution


@dataclass(frozen=True)
class RunOptions:
    """Everything that decides a run's outputs (recorded in the manifest)."""

    segment: SegmentOptions = field(default_factory=SegmentOptions)
    backend: str = "auto"
    mpp: float | None = None  # µm/px for files without resolution metadata
    tissue_mpp: float = 8.0
    tissue_min_area_um2: float = 20000.0
    simplify_cells: float = 0.0  # polygon simplification tolerance, in feature cells (0: exact cell edges)
    apply_bounds_offset: bool = True  # subtract OpenSlide bounds-x/-y so GeoJSON lands where QuPath shows it
    overwrite: bool = False
    tma: bool | None = None  # None: dearray whole slides that look like a TMA; True/False: always/never
    core_diameter_um: float | None = None  # TMA core diameter; None: estimated
    case_ids: dict[str, str] = field(default_factory=dict)  # TMA core name -> case id

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SlideResult:
    """What a run records about one slide (small: workers on other machines return this)."""

    name: str
    path: str
    status: str  # "done", "failed", "skipped" (already complete)
    error: str | None = None
    regions: list[dict[str, Any]] = field(default_factory=list)  # biomarker rows
    outputs: list[str] = field(default_factory=list)
    failed_regions: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    tissue_area_mm2: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slide_dir(out_dir: Path, source: SlideSource) -> Path:
    return out_dir / source.name


def load_record(out_dir: Path, source: SlideSource) -> SlideResult | None:
    """A finished slide's record, or None when the slide must be (re)done."""
    path = _slide_dir(out_dir, source) / SLIDE_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        result = SlideResult(**data)
    except (OSError, ValueError, TypeError):
        return None
    if result.path != str(source.path) or not all((out_dir / p).is_file() for p in result.outputs):
        return None
    return result


def process_slide(
    source: SlideSource,
    out_dir: Path,
    extractor: Extractor,
    options: RunOptions,
    feature_identity: dict[str, Any],
    *,
    model: ClusterModel | None = None,
    progress: ProgressCallback = no_progress,
) -> SlideResult:
    """Segment every region of one slide and write its outputs; errors become a failed result, not a raise."""
    if not options.overwrite:
        done = load_record(out_dir, source)
        if done is not None:
            done.status = "skipped"
            return done
    start = time.perf_counter()
    result = SlideResult(name=source.name, path=str(source.path), status="failed")
    remove_stale_temporaries(_slide_dir(out_dir, source))  # what a killed run of this slide left behind
    try:
        with open_slide(source.path, backend=options.backend, mpp=source.mpp or options.mpp) as slide:
            _segment_slide(slide, source, out_dir, extractor, options, feature_identity, model, progress, result)
        result.status = "done"
    except EquisegError as exc:
        result.error = " ".join(str(exc).split())
    except MemoryError:
        result.error = f"{source.path}: out of memory"
    except Exception as exc:  # one bad slide must not stop a batch; the manifest carries the cause
        log.debug("unexpected failure on %s", source.path, exc_info=True)
        result.error = f"{source.path}: {exc.__class__.__name__}: {' '.join(str(exc).split())}"
    result.seconds["total"] = round(time.perf_counter() - start, 3)
    if result.status == "done":
        record = _slide_dir(out_dir, source) / SLIDE_RECORD
        atomic_write_text(record, json.dumps(result.as_dict(), indent=1) + "\n")  # keeps column order
    return result


def _segment_slide(
    slide: Slide,
    source: SlideSource,
    out_dir: Path,
    extractor: Extractor,
    options: RunOptions,
    feature_identity: dict[str, Any],
    model: ClusterModel | None,
    progress: ProgressCallback,
    result: SlideResult,
) -> None:
    t0 = time.perf_counter()
    found = slide_regions(slide, is_core=source.is_core, core_name=source.core or source.name,
                          tissue_mpp=options.tissue_mpp, min_tissue_area_um2=options.tissue_min_area_um2,
                          tma=options.tma, core_diameter_um=options.core_diameter_um)
    grid, areas = found.grid, found.areas
    folder = _slide_dir(out_dir, source)
    outputs: list[Path] = []
    if grid is not None:
        outputs.extend(export_dearray(grid, slide, folder, case_ids=options.case_ids).values())
    result.seconds["tissue"] = round(time.perf_counter() - t0, 3)
    if not areas:
        raise NoTissueError(f"{source.path}: no tissue found (tissue fraction {found.tissue.tissue_fraction:.1%})")
    folder.mkdir(parents=True, exist_ok=True)
    offset = slide.bounds_offset if options.apply_bounds_offset else (0, 0)
    seg_opts = options.segment
    k = model.k if model is not None else seg_opts.n_clusters
    features: list[dict[str, Any]] = []
    t_features = 0.0
    for area in areas:
        t1 = time.perf_counter()
        try:
            seg = segment_region(slide, area, extractor, seg_opts, model=model,
                                 feature_identity=feature_identity, progress=progress)
        except EquisegError as exc:  # e.g. too little tissue for K clusters: the slide's other regions go on
            result.failed_regions[area.name] = " ".join(str(exc).split())
            continue
        t_features += time.perf_counter() - t1
        identity = {"slide": source.slide, "region": area.name, "source_path": str(source.path),
                    "case_id": source.case_id}
        if grid is not None:  # 1-based like the cores CSV
            core = grid.core(area.name)
            identity.update(grid_row=core.row + 1, grid_column=core.col + 1,
                            case_id=options.case_ids.get(area.name, source.case_id))
        result.regions.append(compute_biomarkers(seg.labels, seg.rgb, k, seg.cell_um, identity))
        result.tissue_area_mm2 += float((seg.labels > 0).sum()) * seg.cell_um**2 / 1e6
        features.extend(_region_annotations(source, seg, k, offset, options.simplify_cells))
        outputs.extend(_region_pictures(slide, folder, seg, k))
    if not result.regions:
        reasons = "; ".join(f"{k}: {v}" for k, v in result.failed_regions.items())
        raise NoTissueError(f"{source.path}: no region could be segmented ({reasons})")
    result.seconds["segment"] = round(t_features, 3)
    geojson = folder / f"{source.name}.geojson"
    write_geojson(geojson, features)
    table = write_csv(folder / "biomarkers.csv", result.regions)
    outputs.extend([geojson, table])
    result.outputs = sorted(str(p.relative_to(out_dir)) for p in outputs)


def _region_annotations(
    source: SlideSource, seg: RegionSegmentation, k: int, offset: tuple[int, int], simplify_cells: float
) -> list[dict[str, Any]]:
    """QuPath annotations: the region outline, then one classified MultiPolygon per cluster."""
    placement = GridPlacement(seg.x0 - offset[0], seg.y0 - offset[1], seg.cell_level0)
    polygons = label_map_to_polygons(seg.labels, placement, simplify_cells)
    outline = tissue_outline(seg.labels, placement, simplify_cells, polygons=polygons)
    measurements = segment_measurements(seg.labels, k, seg.cell_um)
    tissue_um2 = float((seg.labels > 0).sum()) * seg.cell_um**2
    meta = {"slide": source.slide, "region": seg.name, "source": source.path.name}
    out = [qupath_feature(
        outline, object_id=object_id(source.name, seg.name), name=seg.name,
        measurements={"Tissue area µm^2": tissue_um2}, metadata=meta, locked=True,
    )]
    for cluster, geom in polygons.items():
        m = measurements[cluster]
        out.append(qupath_feature(
            geom, object_id=object_id(source.name, seg.name, cluster), name=f"{seg.name} {cluster_class_name(cluster)}",
            class_name=cluster_class_name(cluster), color=cluster_color(cluster - 1),
            measurements={"Area µm^2": m["area_um2"], "Fraction of region": m["fraction_of_region"],
                          "Components": m["n_components"]},
            metadata={**meta, "cluster": str(cluster)},
        ))
    return out


def _region_pictures(slide: Slide, folder: Path, seg: RegionSegmentation, k: int) -> list[Path]:
    """Overlay PNG (tissue + translucent segments + legend) and the label map as a palette PNG."""
    colors = [cluster_color(i) for i in range(k)]
    names = [cluster_class_name(i + 1) for i in range(k)]
    h, w = seg.labels.shape
    extent = max(h, w) * seg.cell_level0 * slide.mpp  # µm
    mpp = max(extent / OVERLAY_MAX_SIDE, seg.cell_um / 8)
    scale = mpp / slide.mpp
    width = max(1, round(w * seg.cell_level0 / scale))
    height = max(1, round(h * seg.cell_level0 / scale))
    rgb = slide.read_region(seg.x0, seg.y0, width, height, mpp)
    overlay = folder / f"{seg.name}_overlay.png"
    save_png(overlay, render_overlay(rgb, seg.labels, colors, names, title=seg.name))
    labels = folder / f"{seg.name}_labels.png"
    save_png(labels, label_image(seg.labels, colors))
    return [overlay, labels]


def check_writable(out_dir: Path) -> None:
    """Fail before any work when the output folder cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / ".equiseg-write-test", "ok\n", fsync=False)
        (out_dir / ".equiseg-write-test").unlink()
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot write outputs here ({exc.strerror or exc})") from exc


def write_run_outputs(
    out_dir: Path, results: Sequence[SlideResult], options: RunOptions, model_info: dict[str, Any]
) -> tuple[Path, Path | None]:
    """`OUT/manifest.json` (tool, options, model, per-slide status) and `OUT/biomarkers.csv` (all regions)."""
    rows = [row for r in results for row in r.regions]
    table = write_csv(out_dir / "biomarkers.csv", rows) if rows else None
    manifest = {
        "tool": "equiseg",
        "version": __version__,
        "options": options.as_dict(),
        "model": model_info,
        "slides": [r.as_dict() for r in results],
        "summary": {
            "slides": len(results),
            "done": sum(r.status in ("done", "skipped") for r in results),
            "failed": sum(r.status == "failed" for r in results),
            "regions": len(rows),
        },
    }
    path = out_dir / "manifest.json"
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True, default=_json_default) + "\n")
    return path, table


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def run_slides(
    sources: Sequence[SlideSource],
    out_dir: Path,
    extractor: Extractor,
    options: RunOptions,
    feature_identity: dict[str, Any],
    *,
    model: ClusterModel | None = None,
    on_slide: Callable[[int, SlideSource], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> list[SlideResult]:
    """Process slides one after another in this process (the embedded default executor)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, source in enumerate(sources):
        if on_slide is not None:
            on_slide(i, source)
        results.append(process_slide(source, out_dir, extractor, options, feature_identity,
                                     model=model, progress=progress))
    return results
