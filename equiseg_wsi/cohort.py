"""Cohort clustering: one KMeans model for many cores, and the original method's intra/inter analyses.

Why: cores are comparable only when every core uses the same clusters. `fit_cohort` streams
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.errors import InputError
from equiseg_wsi.features import build_extractor
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import RunJob
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.regions import Failures
from equiseg_wsi.robustness import ModelUnderTest, RotationSeries, run_experiment
from equiseg_wsi.robustness_report import write_rotation_series
from equiseg_wsi.run_files import write_run_outputs
from equiseg_wsi.run_model import fit_regions
from equiseg_wsi.runner import run_slides
from equiseg_wsi.slide_result import SlideResult

__all__ = ["AnalysisResult", "fit_cohort", "inter_subject", "intra_subject", "split_by_slide"]

def fit_cohort(
    sources: Sequence[SlideSource],
    job: RunJob,
    *,
    n_init: int = 10,
    on_region: Callable[[str], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> tuple[ClusterModel, Failures]:
    """`equiseg fit`: one KMeans on `n_samples` interior tissue cells of every region of every source, as the
    run-wide clustering fits it (`run_model.fit_regions`, without a feature cache)."""
    return fit_regions(sources, job, n_init=n_init, on_region=on_region, progress=progress)


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
    failures: Failures = field(default_factory=Failures)  # rotation cores and fitting regions
    model: ClusterModel | None = None
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        """One line per thing that went wrong (slides, rotation cores, fitting regions)."""
        return [r.error or r.name for r in self.slides if r.status == "failed"] + [f.error for f in self.failures]


def _tested(job: RunJob) -> ModelUnderTest:
    identity = build_extractor(job.spec).feature_identity
    return ModelUnderTest(identity.kind, f"{identity.kind} ({identity.source})", job.spec)


def intra_subject(
    sources: Sequence[SlideSource],
    job: RunJob,
    out_dir: Path,
    angles: Sequence[float],
    *,
    on_slide: Callable[[int, SlideSource], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> AnalysisResult:
    """The original intra-subject analysis: `run` with KMeans fitted per core, then each core's rotation
    series (KMeans fitted at 0° on that core, frozen for the other angles)."""
    results = run_slides(sources, out_dir, job, on_start=on_slide, progress=progress)
    write_run_outputs(out_dir, results, job, analysis="intra")
    series, failures = run_experiment(sources, [_tested(job)], job.options, angles, progress=progress)
    return AnalysisResult(results, series, failures, outputs=write_rotation_series(out_dir, series))


def inter_subject(
    train: Sequence[SlideSource],
    test: Sequence[SlideSource],
    job: RunJob,
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
    model, failures = fit_cohort(train, job, on_region=on_region, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = model.save(out_dir / "kmeans_model.npz")
    applied = replace(job, kmeans_model=str(model_path))
    results = run_slides(test, out_dir, applied, on_start=on_slide, progress=progress)
    write_run_outputs(out_dir, results, applied, analysis="inter", trained_on=list(model.sources))
    tested = _tested(job)
    series, rotation_failures = run_experiment(test, [tested], job.options, angles,
                                               cluster_models={tested.name: model}, progress=progress)
    failures.items[:0] = rotation_failures.items  # rotation failures first, as before
    outputs = {"model": model_path, **write_rotation_series(out_dir, series)}
    return AnalysisResult(results, series, failures, model, outputs)
