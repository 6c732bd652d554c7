"""Cohort clustering: one KMeans model for many cores, and the original method's intra/inter analyses.

Why (DESIGN 3.3): cores are comparable only when every core uses the same clusters. `fit_cohort` streams
every core/region (the regions `equiseg run` segments), samples `n_samples` tissue cells from EACH with a
generator seeded from the run seed and the core's name (so a core's sample does not depend on the others),
and fits one KMeans in canonical order. The original inter-subject code fitted on the first image only.

The original commands (`intra_subject.py`, `inter_subject.py`) map onto the product pipeline:

- intra: `run` with KMeans fitted per core, plus each core's rotation series;
- inter: `fit_cohort` on the training cores, then `run` with that model on the test cores, plus each test
  core's rotation series with the same model. Without a test list, :func:`split_by_slide` splits the
  training list by slide id (documented in docs/cohort.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from equiseg_wsi.cluster import ClusterModel, CohortSampler, fit_kmeans, optical_density
from equiseg_wsi.errors import EquisegError, InputError
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.robustness import CoreFailure, ModelUnderTest, RotationSeries, run_experiment, write_rotation_series
from equiseg_wsi.runner import RunOptions, SlideResult, run_slides, write_run_outputs
from equiseg_wsi.segment import Extractor, region_features, slide_regions
from equiseg_wsi.slide import open_slide

__all__ = ["AnalysisResult", "FitFailure", "fit_cohort", "inter_subject", "intra_subject", "split_by_slide"]

_ROWS_PER_CHUNK = 64  # feature-map rows fed to the sampler at a time (bounded memory for memory-mapped maps)


@dataclass
class FitFailure:
    """A core or slide that could not contribute to the fit, with a one-line reason."""

    source: str
    error: str


def fit_cohort(
    sources: Sequence[SlideSource],
    extractor: Extractor,
    feature_identity: dict[str, Any],
    options: RunOptions,
    *,
    n_init: int = 10,
    on_region: Callable[[str], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> tuple[ClusterModel, list[FitFailure]]:
    """Fit one KMeans on `options.segment.n_samples` tissue cells from every region of every source.

    Regions are found as `equiseg run` finds them (`options`: backend, mpp, tissue mask, TMA settings).

    Features are streamed region by region (large regions through a scratch file) and only the per-region
    samples are kept, so memory is one region's features plus n_samples x C floats per region. The model
    records the feature identity and the region names it was fitted on (`slide/region`). Regions that fail
    are returned as :class:`FitFailure`; raises InputError when no tissue cell was sampled at all.
    """
    seg = options.segment
    sampler = CohortSampler(seg.n_samples, seg.seed)
    failures: list[FitFailure] = []
    for source in sources:
        try:
            with open_slide(source.path, backend=options.backend, mpp=source.mpp or options.mpp) as slide:
                found = slide_regions(
                    slide, is_core=source.is_core, core_name=source.core or source.name,
                    tissue_mpp=options.tissue_mpp, min_tissue_area_um2=options.tissue_min_area_um2,
                    tma=options.tma, core_diameter_um=options.core_diameter_um,
                )
                if not found.areas:
                    failures.append(FitFailure(source.name, f"{source.path}: no tissue found"))
                    continue
                for area in found.areas:
                    name = f"{source.name}/{area.name}"
                    if on_region is not None:
                        on_region(name)
                    try:
                        with region_features(slide, area, extractor, seg, progress=progress) as rf:
                            _feed(sampler, name, rf.features, rf.tissue, rf.rgb)
                    except EquisegError as exc:
                        failures.append(FitFailure(name, " ".join(str(exc).split())))
        except EquisegError as exc:
            failures.append(FitFailure(source.name, " ".join(str(exc).split())))
    if not sampler.sources:
        reasons = "; ".join(f"{f.source}: {f.error}" for f in failures) or "no inputs"
        raise InputError(f"no tissue cells to fit on ({reasons})")
    features, od, _ = sampler.result()
    model = fit_kmeans(features, od, seg.n_clusters, seg.seed, n_init=n_init,
                       feature_identity=feature_identity, sources=sampler.sources)
    return model, failures


def _feed(sampler: CohortSampler, name: str, features: np.ndarray, tissue: np.ndarray, rgb: np.ndarray) -> None:
    """Offer a region's tissue cells to the sampler a band of rows at a time (never the whole map in RAM)."""
    for r0 in range(0, tissue.shape[0], _ROWS_PER_CHUNK):
        band = slice(r0, r0 + _ROWS_PER_CHUNK)
        mask = tissue[band]
        if mask.any():
            sampler.feed(name, np.asarray(features[band])[mask], optical_density(rgb[band])[mask])


def split_by_slide(sources: Sequence[SlideSource]) -> tuple[list[SlideSource], list[SlideSource]]:
    """The documented default split of one list into training and test cores, for `inter` without a test list.

    Distinct slide ids (a patient in Gleason 2019) are sorted; the 1st, 3rd, 5th ... go to training and the
    2nd, 4th ... to test, so the two sets never share a slide and the split does not depend on row order.
    """
    slides = sorted({s.slide for s in sources})
    if len(slides) < 2:
        raise InputError(
            f"cannot split {len(sources)} core(s) of {len(slides)} slide into training and test by slide id: "
            "give a test list with --test_data_path"
        )
    train_ids = set(slides[0::2])
    return [s for s in sources if s.slide in train_ids], [s for s in sources if s.slide not in train_ids]


# ------------------------------------------------------------------------------- the original analyses


@dataclass
class AnalysisResult:
    """What `intra_subject` / `inter_subject` did: per-slide results, rotation series, failures, files."""

    slides: list[SlideResult]
    series: list[RotationSeries]
    rotation_failures: list[CoreFailure]
    fit_failures: list[FitFailure] = field(default_factory=list)
    model: ClusterModel | None = None
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        """One line per thing that went wrong (slides, rotation cores, fitting regions)."""
        out = [r.error or r.name for r in self.slides if r.status == "failed"]
        out += [f.error for f in self.rotation_failures]
        out += [f.error for f in self.fit_failures]
        return out


def _tested(extractor: Extractor, identity: dict[str, Any]) -> ModelUnderTest:
    kind = str(identity.get("arch", {}).get("kind", "model"))
    return ModelUnderTest(kind, f"{kind} ({identity.get('source', '')})", extractor, identity)


def intra_subject(
    sources: Sequence[SlideSource],
    extractor: Extractor,
    identity: dict[str, Any],
    options: RunOptions,
    out_dir: Path,
    angles: Sequence[float],
    *,
    on_slide: Callable[[int, SlideSource], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> AnalysisResult:
    """The original intra-subject analysis: `run` with KMeans fitted per core, then each core's rotation
    series (KMeans fitted at 0° on that core, frozen for the other angles)."""
    results = run_slides(sources, out_dir, extractor, options, identity, on_slide=on_slide, progress=progress)
    write_run_outputs(out_dir, results, options, {"extractor": identity, "kmeans_model": None, "analysis": "intra"})
    series, failures = run_experiment(sources, [_tested(extractor, identity)], options, angles, progress=progress)
    return AnalysisResult(results, series, failures, outputs=write_rotation_series(out_dir, series))


def inter_subject(
    train: Sequence[SlideSource],
    test: Sequence[SlideSource],
    extractor: Extractor,
    identity: dict[str, Any],
    options: RunOptions,
    out_dir: Path,
    angles: Sequence[float],
    *,
    on_slide: Callable[[int, SlideSource], None] | None = None,
    on_region: Callable[[str], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> AnalysisResult:
    """The original inter-subject analysis, fitted on EVERY training core: `fit_cohort` on `train`, saved as
    `OUT/kmeans_model.npz`, then `run` with that model on `test`, then each test core's rotation series
    with the same model at every angle."""
    model, fit_failures = fit_cohort(train, extractor, identity, options, on_region=on_region, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = model.save(out_dir / "kmeans_model.npz")
    results = run_slides(test, out_dir, extractor, options, identity, model=model, on_slide=on_slide,
                         progress=progress)
    info = {"extractor": identity, "kmeans_model": str(model_path), "analysis": "inter",
            "trained_on": list(model.sources)}
    write_run_outputs(out_dir, results, options, info)
    tested = _tested(extractor, identity)
    series, failures = run_experiment(test, [tested], options, angles, cluster_models={tested.name: model},
                                      progress=progress)
    outputs = {"model": model_path, **write_rotation_series(out_dir, series)}
    return AnalysisResult(results, series, failures, fit_failures, model, outputs)
