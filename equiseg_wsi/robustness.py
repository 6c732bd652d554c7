"""Rotation experiments (DESIGN 3.6): does a segmentation, and what is measured on it, survive rotating the core?

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
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from equiseg_wsi.biomarkers import IDENTITY_COLUMNS, biomarker_deltas, compute_biomarkers, write_csv
from equiseg_wsi.cluster import ClusterModel
from equiseg_wsi.errors import EquisegError, InputError
from equiseg_wsi.export.atomic import atomic_path
from equiseg_wsi.export.geojson import cluster_class_name, cluster_color
from equiseg_wsi.export.overlay import render_overlay, save_png
from equiseg_wsi.progress import ProgressCallback, no_progress
from equiseg_wsi.robust_metrics import compare_labels
from equiseg_wsi.runner import RunOptions
from equiseg_wsi.segment import Extractor, RegionArea, SegmentOptions, segment_region
from equiseg_wsi.slide import Slide
from equiseg_wsi.tissue import detect_tissue

__all__ = [
    "DEFAULT_ANGLES",
    "METRICS",
    "CoreFailure",
    "ModelUnderTest",
    "RotationSeries",
    "SquareCore",
    "default_models",
    "is_quarter_turn",
    "parse_angles",
    "rotate_array",
    "rotation_series",
    "series_rows",
    "series_strip",
    "square_core",
    "summary_rows",
    "weight_file_models",
    "write_robustness_outputs",
    "write_rotation_series",
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


def rotate_array(a: np.ndarray, angle: float, *, order: int, cval: float) -> np.ndarray:
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
        out = ndimage.affine_transform(src, matrix, offset=offset, order=order, mode="constant", cval=cval,
                                       prefilter=False)
        if order == 0 or plane.dtype.kind == "f":
            return out.astype(plane.dtype, copy=False)
        info = np.iinfo(plane.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(plane.dtype)

    if arr.ndim == 2:
        return one(arr)
    return np.stack([one(arr[..., c]) for c in range(arr.shape[2])], axis=-1)


# --------------------------------------------------------------------------------------------- models


@dataclass
class ModelUnderTest:
    """One frozen feature model of an experiment: a short name for tables, a label saying what it is."""

    name: str
    label: str
    extractor: Extractor
    identity: dict[str, Any]


def default_models(
    *, layer: str = "layer4", device: str = "auto", batch_size: int | None = None, target_mpp: float = 2.5,
    seed: int | None = None,
) -> list[ModelUnderTest]:
    """The packaged SRE-ResNet-18 and its standard-convolution twin, trained the same way.

    When packaged trained weights are installed for BOTH kinds they are used; otherwise both models are the
    seeded random initialisation (same seed, same topology, same scaling rule), so the comparison is never
    a trained model against an untrained one. The labels say which.
    """
    from equiseg_wsi.features import DEFAULT_MODEL_SEED, FeatureExtractor, default_batch_size
    from equiseg_wsi.models import weights as weights_module
    from equiseg_wsi.models.resnet import ArchSpec

    seed = DEFAULT_MODEL_SEED if seed is None else int(seed)
    trained = all(weights_module.has_default_weights(kind) for kind in ("sre", "standard"))
    layers = [n.strip() for n in layer.split("+") if n.strip()]
    if batch_size is None:
        batch_size = default_batch_size(device)
    out = []
    for kind, title in (("sre", "SRE-ResNet-18"), ("standard", "standard-conv ResNet-18 twin")):
        if trained:
            loaded = weights_module.load_weights(weights_module.default_weights(kind), arch=ArchSpec(kind=kind))
        else:
            loaded = weights_module.random_model(ArchSpec(kind=kind), seed=seed)
        extractor = FeatureExtractor(loaded, layers=layers if len(layers) > 1 else layers[0], device=device,
                                     batch_size=batch_size)
        identity = {**extractor.identity(), "target_mpp": float(target_mpp)}
        source = str(identity.get("source", ""))
        how = (f"random init seed={seed} (untrained)" if source.startswith("random-init")
               else f"packaged trained weights ({source[:19]})")
        out.append(ModelUnderTest(kind, f"{title}, {how}", extractor, identity))
    return out


def weight_file_models(
    paths: Sequence[str | Path], *, layer: str = "layer4", device: str = "auto", batch_size: int | None = None,
    target_mpp: float = 2.5,
) -> list[ModelUnderTest]:
    """Any weight files (equiseg or reference SRE-Conv format), named after their file stems."""
    from equiseg_wsi.features import build_extractor

    out: list[ModelUnderTest] = []
    names: dict[str, int] = {}
    for p in paths:
        path = Path(p)
        extractor, identity = build_extractor(path, layer=layer, device=device, batch_size=batch_size,
                                              target_mpp=target_mpp)
        stem = path.stem or "model"
        names[stem] = names.get(stem, 0) + 1
        name = stem if names[stem] == 1 else f"{stem}-{names[stem]}"
        kind = identity.get("arch", {}).get("kind", "?")
        out.append(ModelUnderTest(name, f"{path.name} ({kind} convolution)", extractor, identity))
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


@dataclass
class CoreFailure:
    """A core the experiment could not measure (e.g. no tissue), with a one-line reason."""

    slide: str
    core: str
    error: str


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
    cell_um = {m.name: options.target_mpp * m.extractor.stride for m in models}
    total = len(angle_list) * len(models)
    for ai, angle in enumerate(angle_list):
        rotated = rotate_array(core.rgb, angle, order=1, cval=WHITE)
        slide = Slide.from_array(rotated, mpp=core.mpp, name=f"{core.name}@{angle:g}")
        tissue = detect_tissue(slide, core.tissue_mpp, min_area_um2=tissue_min_area_um2)
        area = RegionArea(core.name, (0.0, 0.0, float(core.side), float(core.side)), tissue)
        for mi, m in enumerate(models):
            model = fixed.get(m.name, fitted.get(m.name))
            seg = segment_region(slide, area, m.extractor, options, model=model, feature_identity=m.identity)
            if m.name not in fitted:
                fitted[m.name] = seg.model
            back = rotate_array(seg.labels, -angle, order=0, cval=0)
            ref = results[m.name][0].labels if results[m.name] else seg.labels
            metrics = compare_labels(ref, back)
            row = compute_biomarkers(seg.labels, seg.rgb, seg.model.k, seg.cell_um, core.identity)
            results[m.name].append(AngleResult(angle, seg.labels, back, seg.rgb, metrics, row))
            progress(ai * len(models) + mi + 1, total, "segmentations")
    return [
        RotationSeries(m.name, m.label, core, cell_um[m.name], fitted[m.name].k, fitted[m.name], results[m.name])
        for m in models
    ]


# ------------------------------------------------------------------------------------------- tables


def _angle_group(angle: float) -> str:
    if math.isclose(float(angle) % 360.0, 0.0):
        return "reference"
    return "90-multiple" if is_quarter_turn(angle) else "off-grid"


def _series_identity(s: RotationSeries) -> dict[str, Any]:
    ident = s.core.identity
    return {"model": s.model, "slide": ident.get("slide", ""), "core": ident.get("region", s.core.name)}


def series_rows(series: Sequence[RotationSeries]) -> list[dict[str, Any]]:
    """One row per model, core and angle: the three scores against 0°, then that angle's biomarker row."""
    rows = []
    for s in series:
        for a in s.angles:
            row: dict[str, Any] = {**_series_identity(s), "angle_deg": float(a.angle),
                                   "angle_group": _angle_group(a.angle)}
            row.update({k: a.metrics[k] for k in ("n_shared", *METRICS)})
            row.update({k: v for k, v in a.biomarkers.items() if k not in ("slide", "region")})
            rows.append(row)
    return rows


def long_rows(series: Sequence[RotationSeries]) -> list[dict[str, Any]]:
    """`robustness.csv`: one row per model, core, angle and metric (scores, then biomarker deltas from 0°)."""
    rows = []
    for s in series:
        ref = s.angles[0].biomarkers
        numeric = [k for k, v in ref.items() if k not in _NOT_MEASURED and isinstance(v, (int, float))
                   and not isinstance(v, bool)]
        for a in s.angles:
            base = {**_series_identity(s), "angle_deg": float(a.angle), "angle_group": _angle_group(a.angle)}
            for k in ("n_shared", *METRICS):
                rows.append({**base, "metric": k, "value": float(a.metrics[k])})
            for k in numeric:
                rows.append({**base, "metric": f"delta:{k}", "value": float(a.biomarkers[k]) - float(ref[k])})
    return rows


_NOT_MEASURED = frozenset((*IDENTITY_COLUMNS, "n_clusters", "cell_size_um"))


def _composition(k: int) -> list[str]:
    return ["entropy_bits", *[f"c{i}_fraction" for i in range(1, k + 1)]]


def summary_rows(series: Sequence[RotationSeries]) -> list[dict[str, Any]]:
    """`summary.csv`: per model, mean and worst of each score over cores and angles (off-grid and 90°
    multiples apart; 0° excluded), then each biomarker's coefficient of variation over all angles (mean and
    worst over cores), with two aggregates: `cv:composition` (cluster fractions and entropy) and `cv:all`."""
    rows: list[dict[str, Any]] = []
    by_model: dict[str, list[RotationSeries]] = {}
    for s in series:
        by_model.setdefault(s.model, []).append(s)
    for model, group in by_model.items():
        label = group[0].model_label
        for metric in METRICS:
            for angles in ("off-grid", "90-multiple"):
                vals = [a.metrics[metric] for s in group for a in s.angles if _angle_group(a.angle) == angles]
                if vals:
                    rows.append({"model": model, "model_label": label, "statistic": metric, "angles": angles,
                                 "n": len(vals), "mean": float(np.mean(vals)), "worst": float(np.min(vals))})
        deltas = [s.deltas() for s in group]
        cv_cols = [c for c in deltas[0] if c.endswith("_cv")]
        composition = {f"{c}_cv" for c in _composition(group[0].k)}
        per_core_all = [float(np.mean([d[c] for c in cv_cols])) for d in deltas]
        per_core_comp = [float(np.mean([d[c] for c in cv_cols if c in composition])) for d in deltas]
        for name, vals in (("cv:composition", per_core_comp), ("cv:all", per_core_all)):
            rows.append({"model": model, "model_label": label, "statistic": name, "angles": "all",
                         "n": len(vals), "mean": float(np.mean(vals)), "worst": float(np.max(vals))})
        for c in cv_cols:
            vals = [d[c] for d in deltas]
            rows.append({"model": model, "model_label": label, "statistic": f"cv:{c[:-3]}", "angles": "all",
                         "n": len(vals), "mean": float(np.mean(vals)), "worst": float(np.max(vals))})
    return rows


# ------------------------------------------------------------------------------------------- pictures


def _colors(k: int) -> list[tuple[int, int, int]]:
    return [cluster_color(i) for i in range(k)]


def _content_cells(s: RotationSeries) -> tuple[slice, slice]:
    """Cells covering the core's original box in the 0° frame (crops away the padding)."""
    x, y, w, h = s.core.content
    stride = max(1, round(s.cell_um / s.core.mpp))
    return slice(y // stride, -(-(y + h) // stride)), slice(x // stride, -(-(x + w) // stride))


def series_strip(s: RotationSeries, min_panel: int = 160) -> Image.Image:
    """The original method's picture, one strip per core: the segmentation at every angle rotated back to 0°,
    drawn over the 0° image (the core's box only), each panel captioned with its angle and pixel agreement.
    Panels are at least `min_panel` px wide (whole pixels per feature cell)."""
    rows, cols = _content_cells(s)
    stride = max(1, round(s.cell_um / s.core.mpp))
    image = s.core.rgb[rows.start * stride : rows.stop * stride, cols.start * stride : cols.stop * stride]
    n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
    cell_px = max(2, math.ceil(min_panel / max(n_rows, n_cols)))
    height, width = n_rows * cell_px, n_cols * cell_px
    base = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)).astype(np.float32)
    palette = np.array([(0, 0, 0), *_colors(s.k)], dtype=np.float32)
    font = ImageFont.load_default()
    pad, caption = 6, 30
    canvas = Image.new("RGB", (len(s.angles) * (width + pad) + pad, height + caption + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, a in enumerate(s.angles):
        lab = a.labels_back[rows, cols]
        up = np.kron(lab, np.ones((cell_px, cell_px), dtype=lab.dtype))
        tinted = base.copy()
        inside = up > 0
        tinted[inside] = 0.45 * tinted[inside] + 0.55 * palette[up[inside]]
        x = pad + i * (width + pad)
        canvas.paste(Image.fromarray(tinted.round().astype(np.uint8)), (x, pad + caption))
        draw.text((x, pad), f"{a.angle:g} deg", fill=(0, 0, 0), font=font)
        draw.text((x, pad + 13), f"agreement {a.metrics['pixel_agreement']:.3f}", fill=(0, 0, 0), font=font)
    return canvas


def _disagreement(s: RotationSeries, a: AngleResult) -> Image.Image:
    ref = s.angles[0].labels
    shared = (ref > 0) & (a.labels_back > 0)
    pic = np.full(ref.shape + (3,), 255, dtype=np.uint8)
    pic[(ref > 0) | (a.labels_back > 0)] = (200, 200, 200)
    pic[shared & (ref == a.labels_back)] = (120, 120, 120)
    pic[shared & (ref != a.labels_back)] = (220, 30, 30)
    return Image.fromarray(pic)


def worst_case_picture(s: RotationSeries, a: AngleResult, min_side: int = 320) -> Image.Image:
    """0° segmentation | θ segmentation rotated back | disagreement (red: different cluster; grey: same),
    on the core's box at 0°, enlarged to at least `min_side` px so a small core stays readable."""
    rows, cols = _content_cells(s)
    stride = max(1, round(s.cell_um / s.core.mpp))
    img = s.core.rgb[rows.start * stride : rows.stop * stride, cols.start * stride : cols.stop * stride]
    factor = max(1, math.ceil(min_side / max(img.shape[:2])))
    if factor > 1:
        size = (img.shape[1] * factor, img.shape[0] * factor)
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
    colors, names = _colors(s.k), [cluster_class_name(i + 1) for i in range(s.k)]
    left = render_overlay(img, s.angles[0].labels[rows, cols], colors, names, title=f"{s.model}, 0 deg")
    mid = render_overlay(img, a.labels_back[rows, cols], colors, names, title=f"{a.angle:g} deg, rotated back")
    dis = _disagreement(s, a).crop((cols.start, rows.start, cols.stop, rows.stop))
    dis = dis.resize((img.shape[1], img.shape[0]), Image.Resampling.NEAREST)
    pad, caption = 8, 16
    width = left.width + mid.width + dis.width + 2 * pad
    canvas = Image.new("RGB", (width, max(left.height, mid.height, dis.height + caption)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(mid, (left.width + pad, 0))
    canvas.paste(dis, (left.width + mid.width + 2 * pad, caption))
    text = (f"red: different cluster (dice {a.metrics['mean_dice']:.3f}, "
            f"agreement {a.metrics['pixel_agreement']:.3f})")
    ImageDraw.Draw(canvas).text((left.width + mid.width + 2 * pad, 2), text, fill=(0, 0, 0),
                                font=ImageFont.load_default())
    return canvas


def plot_metrics(series: Sequence[RotationSeries], path: str | Path) -> Path:
    """Each score vs angle: one line per model (mean over cores) with the min–max spread over cores shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(METRICS), sharex=True)
    by_model: dict[str, list[RotationSeries]] = {}
    for s in series:
        by_model.setdefault(s.model, []).append(s)
    for ax, metric in zip(axes, METRICS, strict=True):
        for group in by_model.values():
            angles = [a.angle for a in group[0].angles]
            vals = np.array([[a.metrics[metric] for a in s.angles] for s in group])
            ax.plot(angles, vals.mean(axis=0), marker="o", ms=3, label=group[0].model_label)
            ax.fill_between(angles, vals.min(axis=0), vals.max(axis=0), alpha=0.2)
        top = max(a.angle for s in series for a in s.angles)
        for q in (90, 180, 270):
            if q <= top:
                ax.axvline(q, color="0.85", lw=0.8, zorder=0)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("rotation (degrees)")
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score vs 0° (shared tissue)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    p = Path(path)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return p


def write_robustness_outputs(
    out_dir: str | Path, series: Sequence[RotationSeries], *, failures: Sequence[CoreFailure] = ()
) -> dict[str, Path]:
    """`robustness.csv`, `summary.csv`, `by_angle.csv` (scores + biomarkers per angle), `robustness.png`,
    `worst_<model>.png` (the core and angle with the lowest mean Dice) and `failures.csv` if any."""
    if not series:
        raise InputError("no core could be measured: nothing to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "robustness": write_csv(out / "robustness.csv", long_rows(series)),
        "summary": write_csv(out / "summary.csv", summary_rows(series)),
        "by_angle": write_csv(out / "by_angle.csv", series_rows(series)),
        "plot": plot_metrics(series, out / "robustness.png"),
    }
    models = list(dict.fromkeys(s.model for s in series))
    for model in models:
        candidates = [(a.metrics["mean_dice"], i, j) for i, s in enumerate(series) if s.model == model
                      for j, a in enumerate(s.angles) if j > 0]
        if not candidates:
            continue
        _, i, j = min(candidates)
        path = out / f"worst_{model}.png"
        save_png(path, worst_case_picture(series[i], series[i].angles[j]))
        paths[f"worst_{model}"] = path
    if failures:
        paths["failures"] = write_csv(out / "failures.csv", [vars(f) for f in failures])
    return paths


def write_rotation_series(out_dir: str | Path, series: Sequence[RotationSeries]) -> dict[str, Path]:
    """What the original method drew, per core: `rotation/<slide>_<core>.png` (the segmentation at every
    angle rotated back to 0°, one strip per core) and `rotation.csv` (one row per core and angle: scores
    against 0° and that angle's biomarkers)."""
    out = Path(out_dir)
    folder = out / "rotation"
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    several = len({x.model for x in series}) > 1
    for s in series:
        ident = _series_identity(s)
        name = f"{ident['slide']}_{ident['core']}" + (f"_{s.model}" if several else "")
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        path = folder / f"{stem}.png"
        save_png(path, series_strip(s))
        paths[stem] = path
    if series:
        paths["table"] = write_csv(out / "rotation.csv", series_rows(series))
    return paths


# ------------------------------------------------------------------------------------------- many cores


def run_experiment(
    sources: Sequence[Any],
    models: Sequence[ModelUnderTest],
    options: RunOptions,
    angles: Sequence[float],
    *,
    cluster_models: Mapping[str, ClusterModel] | None = None,
    on_core: Callable[[str], None] | None = None,
    progress: ProgressCallback = no_progress,
) -> tuple[list[RotationSeries], list[CoreFailure]]:
    """The protocol on every region of every source (`SlideSource`s), regions found as `equiseg run` finds
    them (`options`: backend, mpp, tissue mask, TMA settings; `options.segment` for features and KMeans).

    A core that fails (no tissue, unreadable) becomes a :class:`CoreFailure`; the others go on.
    """
    from equiseg_wsi.segment import slide_regions
    from equiseg_wsi.slide import open_slide

    series: list[RotationSeries] = []
    failures: list[CoreFailure] = []
    stride = max(m.extractor.stride for m in models)
    seg = options.segment
    for source in sources:
        try:
            with open_slide(source.path, backend=options.backend, mpp=source.mpp or options.mpp) as slide:
                found = slide_regions(slide, is_core=source.is_core, core_name=source.core or source.name,
                                      tissue_mpp=options.tissue_mpp, min_tissue_area_um2=options.tissue_min_area_um2,
                                      tma=options.tma, core_diameter_um=options.core_diameter_um)
                if not found.areas:
                    failures.append(CoreFailure(source.slide, source.core or source.name,
                                                f"{source.path}: no tissue found"))
                    continue
                for area in found.areas:
                    if on_core is not None:
                        on_core(f"{source.name}/{area.name}")
                    identity = {"slide": source.slide, "region": area.name, "source_path": str(source.path),
                                "case_id": source.case_id}
                    try:
                        core = square_core(slide, area, seg.target_mpp, tissue_mpp=options.tissue_mpp,
                                           stride=stride, identity=identity)
                        series.extend(rotation_series(core, models, seg, angles, cluster_models=cluster_models,
                                                      tissue_min_area_um2=options.tissue_min_area_um2,
                                                      progress=progress))
                    except EquisegError as exc:
                        failures.append(CoreFailure(source.slide, area.name, " ".join(str(exc).split())))
        except EquisegError as exc:
            failures.append(CoreFailure(source.slide, source.core or source.name, " ".join(str(exc).split())))
    return series, failures
