"""One slide end to end, and many slides one after another, with a manifest that makes runs resumable.

A slide's outputs live in `OUT/<slide>/`; `OUT/<slide>/slide.json` is written last, so its presence means the
slide is complete (every other file is written atomically before it) for the options, model and input in its
run key (`equiseg_wsi.run_key`): a resumed run skips it only when they are unchanged, and redoes it otherwise.
The run-level `manifest.json` and `biomarkers.csv` are rebuilt from those records at the end of every run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from equiseg_wsi import __version__
from equiseg_wsi.biomarkers import compute_biomarkers, segment_measurements, write_csv
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.errors import EquisegError, InputError, NoTissueError, one_line
from equiseg_wsi.export.atomic import atomic_write_text, remove_stale_temporaries
from equiseg_wsi.export.geojson import cluster_class_name, cluster_color, object_id, qupath_feature, write_geojson
from equiseg_wsi.export.overlay import label_image, render_overlay, save_png
from equiseg_wsi.export.tma_outputs import export_dearray
from equiseg_wsi.features import build_extractor
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import RunJob, RunOptions
from equiseg_wsi.polygons import GridPlacement, label_map_to_polygons, tissue_outline
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.regions import Failures, SlideRegions, open_regions
from equiseg_wsi.run_key import REDO_REASONS, changed_parts, run_key
from equiseg_wsi.segment import Extractor, RegionSegmentation, segment_region
from equiseg_wsi.slide import Slide

log = logging.getLogger(__name__)

SLIDE_RECORD = "slide.json"
OVERLAY_MAX_SIDE = 1600  # px; overlays of large regions are drawn at a coarser resolution


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
    warnings: list[str] = field(default_factory=list)  # one line each (too few cells, clusters that vanished)
    seconds: dict[str, float] = field(default_factory=dict)
    tissue_area_mm2: float = 0.0
    run_key: dict[str, str] = field(default_factory=dict)  # digests of the options, model and input that made it
    redone: list[str] = field(default_factory=list)  # parts of the run key that changed since the last complete run

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


@functools.lru_cache(maxsize=4)
def _cached_cluster_model(path: str, stamp: tuple[int, int]) -> ClusterModel:
    return ClusterModel.load(path)


def load_cluster_model(path: str | None) -> ClusterModel | None:
    """A saved cohort model, loaded once per process and file version (workers reuse it for every slide)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the KMeans model ({exc.strerror or exc})") from exc
    return _cached_cluster_model(str(path), (st.st_mtime_ns, st.st_size))


def process_slide(source: SlideSource, out_dir: Path, job: RunJob, *, progress: ProgressCallback = no_progress
                  ) -> SlideResult:
    """Segment every region of one slide and write its outputs; errors become a failed result, not a raise.

    A slide complete from an earlier run with the same run key is skipped (unless `overwrite`); one made with
    other options, model or input is redone, its changed parts in `redone`."""
    options = job.options
    start = time.perf_counter()
    result = SlideResult(name=source.name, path=str(source.path), status="failed")
    previous = load_record(out_dir, source)
    try:
        extractor = build_extractor(job.spec)
        result.run_key = run_key(options, extractor.feature_identity.as_dict(), job.kmeans_model, source)
        if previous is not None and not options.overwrite:
            result.redone = changed_parts(previous.run_key, result.run_key)
            if not result.redone:
                previous.status, previous.redone = "skipped", []
                return previous
        _forget_slide(out_dir, source)
        _segment_slide(source, out_dir, extractor, options, load_cluster_model(job.kmeans_model), progress, result)
        _remove_old_outputs(out_dir, previous, result)
        result.status = "done"
    except EquisegError as exc:
        result.error = one_line(exc)
    except MemoryError:
        result.error = f"{source.path}: out of memory"
    except Exception as exc:  # one bad slide must not stop a batch; the manifest carries the cause
        log.debug("unexpected failure on %s", source.path, exc_info=True)
        result.error = f"{source.path}: {exc.__class__.__name__}: {one_line(exc)}"
    result.seconds["total"] = round(time.perf_counter() - start, 3)
    if result.status == "done":
        record = _slide_dir(out_dir, source) / SLIDE_RECORD
        atomic_write_text(record, json.dumps(result.as_dict(), indent=1) + "\n")  # keeps column order
    return result


def _forget_slide(out_dir: Path, source: SlideSource) -> None:
    """Before (re)doing a slide: its old record no longer vouches for its files, and a killed run's temporaries go."""
    folder = _slide_dir(out_dir, source)
    (folder / SLIDE_RECORD).unlink(missing_ok=True)
    remove_stale_temporaries(folder)


def _remove_old_outputs(out_dir: Path, previous: SlideResult | None, result: SlideResult) -> None:
    """Files the earlier run of this slide wrote that the new one did not (regions that are gone)."""
    if previous is None:
        return
    folder = (out_dir / result.name).resolve()
    for name in set(previous.outputs) - set(result.outputs):
        path = (out_dir / name).resolve()
        if path.parent == folder:
            path.unlink(missing_ok=True)


def _segment_slide(
    source: SlideSource,
    out_dir: Path,
    extractor: Extractor,
    options: RunOptions,
    model: ClusterModel | None,
    progress: ProgressCallback,
    result: SlideResult,
) -> None:
    t0 = time.perf_counter()
    with open_regions(source, options.regions) as (slide, found):
        folder = _slide_dir(out_dir, source)
        outputs: list[Path] = []
        if found.grid is not None:
            outputs.extend(export_dearray(found.grid, slide, folder, case_ids=options.case_ids).values())
        result.seconds["tissue"] = round(time.perf_counter() - t0, 3)
        folder.mkdir(parents=True, exist_ok=True)
        features = _segment_regions(slide, source, found, folder, extractor, options, model, progress, result)
        outputs.extend(features.pictures)
    geojson = folder / f"{source.name}.geojson"
    write_geojson(geojson, features.annotations)
    table = write_csv(folder / "biomarkers.csv", result.regions)
    outputs.extend([geojson, table])
    result.outputs = sorted(str(p.relative_to(out_dir)) for p in outputs)


@dataclass
class _SlideOutputs:
    annotations: list[dict[str, Any]] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)


def _segment_regions(
    slide: Slide, source: SlideSource, found: SlideRegions, folder: Path, extractor: Extractor,
    options: RunOptions, model: ClusterModel | None, progress: ProgressCallback, result: SlideResult,
) -> _SlideOutputs:
    """Segment each region; a region that fails (e.g. too little tissue for K clusters) is recorded and the
    slide's other regions go on. Raises when no region could be segmented."""
    offset = slide.bounds_offset if options.apply_bounds_offset else (0, 0)
    k = model.k if model is not None else options.segment.n_clusters
    out = _SlideOutputs()
    failures = Failures()
    t_features = 0.0
    for area in found.areas:
        t1 = time.perf_counter()
        with failures.catch(source.name, area.name):
            seg = segment_region(slide, area, extractor, options.segment, model=model, progress=progress)
            t_features += time.perf_counter() - t1
            result.warnings.extend(seg.warnings)
            result.regions.append(compute_biomarkers(seg.labels, seg.rgb, k, seg.cell_um,
                                                     _identity(source, found, area.name, options)))
            result.tissue_area_mm2 += float((seg.labels > 0).sum()) * seg.cell_um**2 / 1e6
            out.annotations.extend(_region_annotations(source, seg, k, offset, options.simplify_cells))
            out.pictures.extend(_region_pictures(slide, folder, seg, k))
    result.failed_regions = {f.region: f.error for f in failures}
    if not result.regions:
        reasons = "; ".join(f"{f.region}: {f.error}" for f in failures)
        raise NoTissueError(f"{source.path}: no region could be segmented ({reasons})")
    result.seconds["segment"] = round(t_features, 3)
    return out


def _identity(source: SlideSource, found: SlideRegions, region: str, options: RunOptions) -> dict[str, Any]:
    """The biomarker row's identity columns."""
    identity: dict[str, Any] = {"slide": source.slide, "region": region, "source_path": str(source.path),
                                "case_id": source.case_id}
    if found.grid is not None:  # 1-based like the cores CSV
        core = found.grid.core(region)
        identity.update(grid_row=core.row + 1, grid_column=core.col + 1,
                        case_id=options.case_ids.get(region, source.case_id))
    return identity


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


def label_map_placement(seg: RegionSegmentation) -> dict[str, str]:
    """Where a label PNG lies on the slide (its tEXt chunks): label pixel (r, c) covers level-0 px
    [x0 + c*cell, x0 + (c+1)*cell) x [y0 + r*cell, y0 + (r+1)*cell) of the slide as read (before any OpenSlide
    bounds offset), and one pixel is cell_um µm wide."""
    return {"equiseg:x0_level0": repr(float(seg.x0)), "equiseg:y0_level0": repr(float(seg.y0)),
            "equiseg:cell_level0": repr(float(seg.cell_level0)), "equiseg:cell_um": repr(float(seg.cell_um))}


def _region_pictures(slide: Slide, folder: Path, seg: RegionSegmentation, k: int) -> list[Path]:
    """Overlay PNG (tissue + translucent segments + legend) and the label map as a palette PNG."""
    colors = [cluster_color(i) for i in range(k)]
    names = [cluster_class_name(i + 1) for i in range(k)]
    h, w = seg.labels.shape
    extent = max(h, w) * seg.cell_level0 * slide.mpp  # µm
    mpp = max(extent / OVERLAY_MAX_SIDE, seg.cell_um / 8, slide.mpp)  # never finer than the scan
    scale = mpp / slide.mpp
    width = max(1, round(w * seg.cell_level0 / scale))
    height = max(1, round(h * seg.cell_level0 / scale))
    rgb = slide.read_region(seg.x0, seg.y0, width, height, mpp)
    overlay = folder / f"{seg.name}_overlay.png"
    save_png(overlay, render_overlay(rgb, seg.labels, colors, names, title=seg.name))
    labels = folder / f"{seg.name}_labels.png"
    save_png(labels, label_image(seg.labels, colors), text=label_map_placement(seg))
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
    out_dir: Path, results: Sequence[SlideResult], job: RunJob, **model_extra: Any
) -> tuple[Path, Path | None]:
    """`OUT/manifest.json` (tool, options, model, per-slide status) and `OUT/biomarkers.csv` (all regions).

    The manifest's `model` names the feature identity and the applied KMeans model, plus `model_extra`."""
    options = job.options
    model_info = {"extractor": build_extractor(job.spec).feature_identity.as_dict(), "kmeans_model": job.kmeans_model,
                  **model_extra}
    rows = [row for r in results for row in r.regions]
    redone = [r for r in results if r.status == "done"]  # a failed retry is counted as failed
    mismatch = _column_mismatch(out_dir, results)
    table = write_csv(out_dir / "biomarkers.csv", rows) if rows and mismatch is None else None
    if table is None:  # an earlier run's table would pass for this run's
        (out_dir / "biomarkers.csv").unlink(missing_ok=True)
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
        "resume": {  # slides complete from an earlier run, and those redone because what made them changed
            "skipped": sum(r.status == "skipped" for r in results),
            "redone": sum(bool(r.redone) for r in redone),
            "redone_because": {REDO_REASONS[part]: sum(part in r.redone for r in redone) for part in REDO_REASONS},
        },
    }
    path = out_dir / "manifest.json"
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True, default=_json_default) + "\n")
    if mismatch is not None:
        raise InputError(mismatch)
    return path, table


def _column_mismatch(out_dir: Path, results: Sequence[SlideResult]) -> str | None:
    """Why the slides' tables cannot be merged into one (rows with other columns), naming the two files."""
    first: tuple[str, list[str]] | None = None
    for r in results:
        for row in r.regions:
            if first is None:
                first = (r.name, list(row))
            elif set(row) != set(first[1]):
                extra = [c for c in row if c not in first[1]]
                lacking = [c for c in first[1] if c not in row]
                return (f"{out_dir / 'biomarkers.csv'}: not written: {out_dir / first[0] / 'biomarkers.csv'} and "
                        f"{out_dir / r.name / 'biomarkers.csv'} have different columns (only in the second: "
                        f"{', '.join(extra) or 'none'}; only in the first: {', '.join(lacking) or 'none'}); "
                        "rerun these slides with the same options (--overwrite redoes them all)")
    return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class Executor(Protocol):
    """Runs `process_slide` for each source somewhere (this process, a Dask cluster); results in input order."""

    def map_slides(
        self, job: RunJob, sources: Sequence[SlideSource], out_dir: Path, *,
        on_start: Callable[[int, SlideSource], None] | None = None,
        on_result: Callable[[int, SlideResult], None] | None = None,
        progress: ProgressCallback = no_progress,
    ) -> list[SlideResult]: ...


class InProcess:
    """The embedded default: slides one after another in this process, the model loaded once."""

    def map_slides(
        self, job: RunJob, sources: Sequence[SlideSource], out_dir: Path, *,
        on_start: Callable[[int, SlideSource], None] | None = None,
        on_result: Callable[[int, SlideResult], None] | None = None,
        progress: ProgressCallback = no_progress,
    ) -> list[SlideResult]:
        results = []
        for i, source in enumerate(sources):
            if on_start is not None:
                on_start(i, source)
            result = process_slide(source, out_dir, job, progress=progress)
            if on_result is not None:
                on_result(i, result)
            results.append(result)
        return results


def run_slides(
    sources: Sequence[SlideSource],
    out_dir: Path,
    job: RunJob,
    *,
    executor: Executor | None = None,
    on_start: Callable[[int, SlideSource], None] | None = None,
    on_result: Callable[[int, SlideResult], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> list[SlideResult]:
    """Process every slide with `executor` (default: in this process) and return their results in input order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = executor if executor is not None else InProcess()
    return runner.map_slides(job, sources, out_dir, on_start=on_start, on_result=on_result, progress=progress)
