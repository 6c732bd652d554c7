"""Rotation experiments: does a segmentation, and what is measured on it, survive rotating the core?

Protocol, per core and angle θ (angle 0 first; it is the reference):

1. The core (a core image's tissue box, a TMA core's box, or a tissue piece's box) is read at the target
   µm/px and centred on a white square whose side S is at least the box's diagonal plus 2 px (nothing is cut
   at any angle) and a multiple of 8 px (one feature cell) and of the tissue-mask step (below).
2. The square is rotated about its centre by θ (counter-clockwise as displayed): exactly with ``np.rot90``
   for multiples of 90°, bilinear otherwise, white where the rotation brings in nothing.
3. The rotated square is served as a one-level slide (:meth:`Slide.from_array`), its tissue is detected and
   it is segmented as ONE region covering the whole square, with the frozen feature model and the KMeans
   model fitted at 0° (or a given cohort model). The tissue mask is computed at an integer multiple m of
   the target µm/px (the largest not above the requested tissue µm/px) and S is a multiple of 8·m, so for
   multiples of 90° the mask, the feature-cell grid and the tiles rotate onto themselves exactly.
4. The label map is rotated back by -θ onto the 0° cell grid (nearest; ``np.rot90`` for multiples of 90°)
   and compared with the 0° labels on the cells both label as tissue (:func:`compare_labels`).
5. Biomarkers are computed on each angle's label map in its own frame, and their change from 0° is
   summarised by :func:`biomarker_deltas` (max |Δ| and coefficient of variation over all angles).

Multiples of 90° are reported apart: for SRE features they are exact (agreement 1.0 up to float rounding).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from equiseg_wsi.biomarkers import biomarker_deltas, compute_biomarkers
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.errors import InputError
from equiseg_wsi.features import build_extractor
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.models.arch import DEFAULT_LAYER
from equiseg_wsi.models.weights import RANDOM_INIT, has_default_weights
from equiseg_wsi.options import DEFAULT_MODEL_SEED, DEFAULT_TARGET_MPP, ExtractorSpec, RunOptions, SegmentOptions
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.regions import Failures, RegionArea, each_region
from equiseg_wsi.robust_metrics import compare_labels
from equiseg_wsi.segment import segment_region
from equiseg_wsi.slide import Slide
from equiseg_wsi.tile_features import Extractor
from equiseg_wsi.tissue import detect_tissue

__all__ = [
    "DEFAULT_ANGLES",
    "METRICS",
    "ModelUnderTest",
    "RotationSeries",
    "SquareCore",
    "default_models",
    "is_quarter_turn",
    "parse_angles",
    "rotate_array",
    "rotation_series",
    "square_core",
    "weight_file_models",
]

DEFAULT_ANGLES = "0:360:30"
METRICS: tuple[str, ...] = ("pixel_agreement", "mean_dice", "adjusted_rand_index")
MAX_SQUARE_SIDE = 16384  # px at the target µm/px; larger regions need a coarser target resolution
_CELL = 8  # px per feature cell of the default layer (the square is a multiple of the extractor's stride too)
WHITE = 255


# --------------------------------------------------------------------------------------------- angles


def parse_angles(text: str) -> list[float]:
    """``"start:stop:step"`` (stop excluded, like ``range``) or a comma list ``"0,45,90"``, in degrees.

    0° is always included (it is the reference) and comes first; duplicates modulo 360 are dropped and the
    rest keep ascending order. Raises InputError on anything else.
    """
    t = str(text).strip()
    try:
        if ":" in t:
            parts = [float(p) for p in t.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] <= parts[0]:
                raise ValueError
            start, stop, step = parts
            n = int(math.floor((stop - start) / step - 1e-9)) + 1
            values = [start + i * step for i in range(n)]
        else:
            values = [float(p) for p in re.split(r"[,\s]+", t) if p]
            if not values:
                raise ValueError
    except ValueError:
        raise InputError(
            f"angles {text!r}: give start:stop:step in degrees (e.g. 0:360:30) or a list (e.g. 0,45,90)"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"angles {text!r}: angles must be finite numbers of degrees")
    seen: dict[float, float] = {0.0: 0.0}
    for v in sorted(values, key=lambda a: a % 360.0):
        key = round(v % 360.0, 9) % 360.0
        seen.setdefault(key, v % 360.0)
    return list(seen.values())


def is_quarter_turn(angle: float) -> bool:
    """True for multiples of 90° (rotated exactly with ``np.rot90``; reported apart)."""
    return _quarter_turns(angle) is not None


def _quarter_turns(angle: float) -> int | None:
    a = float(angle) % 360.0
    k = round(a / 90.0)
    return int(k) % 4 if abs(a - 90.0 * k) < 1e-9 else None


def rotate_array(a: np.ndarray, angle: float, *, order: Literal[0, 1], cval: float) -> np.ndarray:
    """Rotate an (h, w) or (h, w, c) array about its centre by ``angle`` degrees, counter-clockwise as shown.

    Multiples of 90° use ``np.rot90`` (exact; a square stays on its own grid). Other angles resample with
    spline ``order`` (0 = nearest for labels, 1 = bilinear for images) and ``cval`` where nothing maps; the
    output has the input's shape, so content must already fit inside the largest centred circle.
    """
    arr = np.asarray(a)
    k = _quarter_turns(angle)
    if k is not None:
        return np.ascontiguousarray(np.rot90(arr, k, axes=(0, 1)))
    h, w = arr.shape[:2]
    t = math.radians(float(angle))
    matrix = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    offset = centre - matrix @ centre

    def one(plane: np.ndarray) -> np.ndarray:
        src = plane if order == 0 else plane.astype(np.float32)
        out = np.asarray(ndimage.affine_transform(src, matrix, offset=offset, order=order, mode="constant", cval=cval,
                                                  prefilter=False))
        if order == 0 or plane.dtype.kind == "f":
            return out.astype(plane.dtype, copy=False)
        info = np.iinfo(plane.dtype)
        rounded: np.ndarray = np.clip(np.rint(out), info.min, info.max).astype(plane.dtype)
        return rounded

    if arr.ndim == 2:
        return one(arr)
    return np.stack([one(arr[..., c]) for c in range(arr.shape[2])], axis=-1)


# --------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelUnderTest:
    """One frozen feature model of an experiment: a short name for tables, a label saying what it is."""

    name: str
    label: str
    spec: ExtractorSpec

    @property
    def extractor(self) -> Extractor:
        return build_extractor(self.spec)


def default_models(
    *, layer: str = DEFAULT_LAYER, device: str = "auto", batch_size: int | None = None,
    target_mpp: float = DEFAULT_TARGET_MPP,
) -> list[ModelUnderTest]:
    """The packaged SRE model and its standard-convolution twin, trained the same way.

    When packaged trained weights are installed for BOTH kinds they are used; otherwise both models are the
    seeded random initialisation (same seed, same topology, same scaling rule), so the comparison is never
    a trained model against an untrained one. The labels say which.
    """
    missing = [kind for kind in ("sre", "standard") if not has_default_weights(kind)]
    trained = not missing
    why = f"; the packaged {' and '.join(missing)} weights are not installed" if missing else ""
    out = []
    for kind, title in (("sre", "SRE-ResNet"), ("standard", "standard-conv ResNet twin")):
        spec = ExtractorSpec(None if trained else RANDOM_INIT, layer, device, batch_size, target_mpp, kind)
        source = build_extractor(spec).feature_identity.source
        how = (f"random init seed={DEFAULT_MODEL_SEED} (untrained{why})" if source.startswith("random-init")
               else f"packaged trained weights ({source[:19]})")
        out.append(ModelUnderTest(kind, f"{title}, {how}", spec))
    return out


def weight_file_models(
    paths: Sequence[str | Path], *, layer: str = DEFAULT_LAYER, device: str = "auto", batch_size: int | None = None,
    target_mpp: float = DEFAULT_TARGET_MPP,
) -> list[ModelUnderTest]:
    """Any weight files (equiseg or reference SRE-Conv format), named after their file stems."""
    out: list[ModelUnderTest] = []
    names: dict[str, int] = {}
    for p in paths:
        path = Path(p)
        spec = ExtractorSpec(str(path), layer, device, batch_size, target_mpp)
        kind = build_extractor(spec).feature_identity.kind
        stem = path.stem or "model"
        names[stem] = names.get(stem, 0) + 1
        name = stem if names[stem] == 1 else f"{stem}-{names[stem]}"
        out.append(ModelUnderTest(name, f"{path.name} ({kind} convolution)", spec))
    return out


# ------------------------------------------------------------------------------------------ the square


@dataclass
class SquareCore:
    """A core centred on a white square at the target µm/px, ready to be rotated (see the module docstring)."""

    name: str
    rgb: np.ndarray  # (S, S, 3) uint8
    mpp: float  # µm/px of `rgb` (the target resolution)
    tissue_mpp: float  # µm/px of the tissue mask: an integer multiple of `mpp`
    content: tuple[int, int, int, int]  # (x, y, w, h) of the original box inside the square, px
    identity: dict[str, Any] = field(default_factory=dict)  # biomarker identity (slide, region, ...)

    @property
    def side(self) -> int:
        return int(self.rgb.shape[0])


def tissue_step(target_mpp: float, tissue_mpp: float) -> int:
    """Tissue-mask pixels span this many target pixels: the largest integer with step·target ≤ tissue µm/px."""
    return max(1, int(math.floor(tissue_mpp / target_mpp + 1e-9)))


def square_core(
    slide: Slide,
    area: RegionArea,
    target_mpp: float,
    *,
    tissue_mpp: float = 8.0,
    stride: int = _CELL,
    identity: Mapping[str, Any] | None = None,
) -> SquareCore:
    """Read `area`'s box at `target_mpp` and centre it on a white square that no rotation can overflow."""
    x0, y0, w0, h0 = area.rect_level0
    scale = target_mpp / slide.mpp
    w, h = max(1, math.ceil(w0 / scale - 1e-9)), max(1, math.ceil(h0 / scale - 1e-9))
    step = tissue_step(target_mpp, tissue_mpp)
    unit = math.lcm(int(stride), _CELL) * step
    side = math.ceil((math.hypot(w, h) + 2) / unit) * unit
    if side > MAX_SQUARE_SIDE:
        raise InputError(
            f"region {area.name}: {side} px square at {target_mpp} µm/px is too large for the rotation protocol "
            f"(limit {MAX_SQUARE_SIDE}); use a coarser --target-mpp"
        )
    rgb = np.full((side, side, 3), WHITE, dtype=np.uint8)
    cx, cy = (side - w) // 2, (side - h) // 2
    rgb[cy : cy + h, cx : cx + w] = slide.read_region(x0, y0, w, h, target_mpp)
    return SquareCore(area.name, rgb, float(target_mpp), step * float(target_mpp), (cx, cy, w, h),
                      dict(identity or {}))


# -------------------------------------------------------------------------------------------- series


@dataclass
class AngleResult:
    """One angle of one model: label maps in both frames, the comparison with 0° and the biomarker row."""

    angle: float
    labels: np.ndarray  # (n, n) in the rotated frame, 0 = background
    labels_back: np.ndarray  # rotated back onto the 0° cell grid
    rgb: np.ndarray  # (n, n, 3) mean colour per cell in the rotated frame
    metrics: dict[str, float]
    biomarkers: dict[str, Any]


@dataclass
class RotationSeries:
    """All angles of one core under one model; `cluster_model` is the KMeans fitted at 0° (or the one given)."""

    model: str
    model_label: str
    core: SquareCore
    cell_um: float
    k: int
    cluster_model: ClusterModel
    angles: list[AngleResult]

    def deltas(self) -> dict[str, float]:
        """Each biomarker's max |Δ| from 0° and its coefficient of variation over the angles."""
        return biomarker_deltas({a.angle: a.biomarkers for a in self.angles})

    def at(self, angle: float) -> AngleResult:
        for a in self.angles:
            if math.isclose(a.angle, angle):
                return a
        raise KeyError(angle)


def rotation_series(
    core: SquareCore,
    models: Sequence[ModelUnderTest],
    options: SegmentOptions,
    angles: Sequence[float],
    *,
    cluster_models: Mapping[str, ClusterModel] | None = None,
    tissue_min_area_um2: float = 20000.0,
    progress: ProgressCallback = no_progress,
) -> list[RotationSeries]:
    """Run the protocol on one core for every model; one :class:`RotationSeries` per model.

    Each angle's rotated square is made and its tissue detected once and shared by the models. A model
    named in `cluster_models` applies that KMeans model at every angle (inter-subject); otherwise KMeans
    is fitted on the 0° segmentation (intra) and reused, frozen, at the other angles.
    """
    angle_list = [float(a) for a in angles]
    if not angle_list or not math.isclose(angle_list[0] % 360.0, 0.0):
        raise InputError("the first angle must be 0° (the reference)")
    fixed = dict(cluster_models or {})
    stride = {m.extractor.stride for m in models}
    if any(core.side % s for s in stride):
        raise InputError(f"square side {core.side} px is not a multiple of the feature strides {sorted(stride)}")
    results: dict[str, list[AngleResult]] = {m.name: [] for m in models}
    fitted: dict[str, ClusterModel] = {}
    cell_um: dict[str, float] = {}  # side of one label-map pixel (a feature cell, or a fine pixel when refined)
    total = len(angle_list) * len(models)
    for ai, angle in enumerate(angle_list):
        rotated = rotate_array(core.rgb, angle, order=1, cval=WHITE)
        slide = Slide.from_array(rotated, mpp=core.mpp, name=f"{core.name}@{angle:g}")
        tissue = detect_tissue(slide, core.tissue_mpp, min_area_um2=tissue_min_area_um2)
        area = RegionArea(core.name, (0.0, 0.0, float(core.side), float(core.side)), tissue)
        for mi, m in enumerate(models):
            model = fixed.get(m.name, fitted.get(m.name))
            seg = segment_region(slide, area, m.extractor, options, model=model)
            if m.name not in fitted:
                fitted[m.name] = seg.model
            cell_um.setdefault(m.name, seg.cell_um)
            back = rotate_array(seg.labels, -angle, order=0, cval=0)
            ref = results[m.name][0].labels if results[m.name] else seg.labels
            metrics = compare_labels(ref, back)
            row = compute_biomarkers(seg.labels, seg.rgb, seg.model.k, seg.cell_um, core.identity, seg.coverage())
            results[m.name].append(AngleResult(angle, seg.labels, back, seg.rgb, metrics, row))
            progress(ai * len(models) + mi + 1, total, "segmentations")
    return [
        RotationSeries(m.name, m.label, core, cell_um[m.name], fitted[m.name].k, fitted[m.name], results[m.name])
        for m in models
    ]


# ------------------------------------------------------------------------------------------- many cores


def run_experiment(
    sources: Sequence[SlideSource],
    models: Sequence[ModelUnderTest],
    options: RunOptions,
    angles: Sequence[float],
    *,
    cluster_models: Mapping[str, ClusterModel] | None = None,
    on_core: Callable[[str], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> tuple[list[RotationSeries], Failures]:
    """The protocol on every region of every source, regions found as `equiseg run` finds them
    (`options.regions`; `options.segment` for features and KMeans).

    A core that fails (no tissue, unreadable) is recorded in the returned failures; the others go on.
    """
    series: list[RotationSeries] = []
    failures = Failures()
    stride = max(m.extractor.stride for m in models)
    seg, regions = options.segment, options.regions
    for item in each_region(sources, regions, failures, on_region=on_core):
        source, area = item.source, item.area
        identity = {"slide": source.slide, "region": area.name, "source_path": str(source.path),
                    "case_id": source.case_id}
        with failures.catch(source.name, area.name):
            core = square_core(item.slide, area, seg.target_mpp, tissue_mpp=regions.tissue_mpp, stride=stride,
                               identity=identity)
            series.extend(rotation_series(core, models, seg, angles, cluster_models=cluster_models,
                                          tissue_min_area_um2=regions.min_tissue_area_um2, progress=progress))
    return series, failures
