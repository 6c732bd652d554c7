"""What a rotation experiment writes: tables per core and angle, a summary, strips, the worst case and a plot.

The measuring itself is in `equiseg_wsi.robustness`; this module only turns its `RotationSeries` into files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from equiseg_wsi.biomarkers import IDENTITY_COLUMNS, write_csv
from equiseg_wsi.errors import InputError
from equiseg_wsi.export.atomic import atomic_path
from equiseg_wsi.export.geojson import cluster_class_name, cluster_color
from equiseg_wsi.export.overlay import render_overlay, save_png
from equiseg_wsi.regions import RegionFailure
from equiseg_wsi.robustness import METRICS, AngleResult, RotationSeries, is_quarter_turn

__all__ = [
    "long_rows",
    "plot_metrics",
    "series_rows",
    "series_strip",
    "summary_rows",
    "worst_case_picture",
    "write_robustness_outputs",
    "write_rotation_series",
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
    out_dir: str | Path, series: Sequence[RotationSeries], *, failures: Iterable[RegionFailure] = ()
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
    failed = [asdict(f) for f in failures]
    if failed:
        paths["failures"] = write_csv(out / "failures.csv", failed)
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
