"""`OUT/cluster_key.png`: what each cluster of a run looks like, so a person can name it.

One row per cluster: its palette colour (the overlays' and QuPath's, `cluster_color`), its name, its mean tissue
colour over the run (the biomarker rows' `c{i}_mean_r/g/b` weighted by `c{i}_area_um2`), its share of the run's
tissue, and up to `PATCHES_PER_CLUSTER` example patches: the tissue around the feature cells whose features lie
nearest the cluster's centroid, taken from as many different slides, then regions, as there are, nearest first.

The exemplar cells are found during segmentation (`exemplar_cells`, while the region's features are at hand) and
travel in the slides' records (`exemplar_records`); the patches are read afterwards by reopening the slides.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from equiseg_wsi.cluster import ClusterModel, l2_normalise
from equiseg_wsi.export.geojson import cluster_class_name, cluster_color
from equiseg_wsi.export.overlay import save_png
from equiseg_wsi.options import RunOptions
from equiseg_wsi.slide import open_slide

log = logging.getLogger(__name__)

__all__ = ["CLUSTER_KEY_NAME", "cluster_key_picture", "exemplar_cells", "exemplar_records", "write_cluster_key"]

CLUSTER_KEY_NAME = "cluster_key.png"
EXEMPLARS_PER_REGION = 3  # cells kept per cluster and region
PATCHES_PER_CLUSTER = 6
PATCH_UM = 96.0  # side of an example patch, µm (read at the run's --target-mpp)
PATCH_PX = 128  # side of a patch in the picture
INFO_W, PAD, CAPTION_H, TITLE_H = 250, 10, 18, 46
_GREY = (235, 235, 235)
MAX_SCANNED = 4096  # candidates per cluster and region looked at for well-spaced exemplars (nearest first)

Exemplar = tuple[int, float, float, float]  # cluster id, squared distance to its centroid, level-0 x, y (cell centre)


def exemplar_cells(features: np.ndarray, labels: np.ndarray, model: ClusterModel, x0: float, y0: float,
                   cell_level0: float, n: int = EXEMPLARS_PER_REGION, *, min_gap: int = 0, chunk: int = 65536
                   ) -> list[Exemplar]:
    """For each cluster, the `n` labelled cells (labels > 0) whose L2-normalised features are nearest its centroid,
    each at least `min_gap` cells (in x or y) from those already taken (0: the plain nearest `n`).

    `features` (h, w, C) and `labels` (h, w) are the region's feature map and `model.predict` labels; each cell is
    measured against the centroid of its own label (its nearest). Sorted by cluster, then distance (ties: raster
    order); positions are the cells' centres in level-0 px. The gap keeps a key's patches from showing one spot
    several times (neighbouring cells have nearly the same features)."""
    idx = np.flatnonzero(np.asarray(labels).ravel() > 0)
    if not idx.size:
        return []
    flat = np.asarray(features).reshape(-1, features.shape[-1])
    lab = np.asarray(labels).ravel()[idx].astype(np.int64) - 1
    c = model.centroids.astype(np.float64)
    c_sq = np.einsum("kc,kc->k", c, c)
    c_t = np.ascontiguousarray(c.T)
    d2 = np.empty(idx.size, dtype=np.float64)
    for start in range(0, idx.size, chunk):
        sel = slice(start, start + chunk)
        x = l2_normalise(flat[idx[sel]]).astype(np.float64)
        own = np.take_along_axis(x @ c_t, lab[sel, None], axis=1)[:, 0]  # x . (centroid of its label)
        d2[sel] = np.einsum("nc,nc->n", x, x) + c_sq[lab[sel]] - 2.0 * own
    out: list[Exemplar] = []
    width = labels.shape[1]
    for cluster in range(model.k):
        members = np.flatnonzero(lab == cluster)
        if members.size > MAX_SCANNED:
            members = members[np.argpartition(d2[members], MAX_SCANNED - 1)[:MAX_SCANNED]]
        taken: list[tuple[int, int]] = []
        for j in members[np.lexsort((idx[members], d2[members]))]:  # nearest first; ties: raster order
            r, col = divmod(int(idx[j]), width)
            if any(abs(r - tr) < min_gap and abs(col - tc) < min_gap for tr, tc in taken):
                continue
            taken.append((r, col))
            out.append((cluster + 1, float(d2[j]), x0 + (col + 0.5) * cell_level0, y0 + (r + 0.5) * cell_level0))
            if len(taken) == n:
                break
    return out


def exemplar_gap(cell_um: float) -> int:
    """Feature cells between a region's exemplars: half a key patch, so their patches overlap by at most half."""
    return max(1, math.ceil(PATCH_UM / 2 / cell_um))


def exemplar_records(region: str, cells: Sequence[Exemplar], slide_mpp: float) -> list[dict[str, Any]]:
    """JSON-able records of a region's exemplar cells, as a slide's record keeps them."""
    return [{"region": region, "cluster": int(k), "d2": round(float(d2), 6), "x": round(float(x), 2),
             "y": round(float(y), 2), "mpp": float(slide_mpp)} for k, d2, x, y in cells]


@dataclass(frozen=True)
class _Pick:
    slide: str
    path: str
    region: str
    d2: float
    x: float
    y: float
    mpp: float


def _candidates(slides: Sequence[Mapping[str, Any]], k: int) -> dict[int, list[_Pick]]:
    out: dict[int, list[_Pick]] = {i: [] for i in range(1, k + 1)}
    for s in slides:
        if s.get("status") not in ("done", "skipped"):
            continue
        for e in s.get("exemplars") or []:
            cluster = int(e["cluster"])
            if cluster in out:
                out[cluster].append(_Pick(str(s["name"]), str(s["path"]), str(e["region"]), float(e["d2"]),
                                          float(e["x"]), float(e["y"]), float(e["mpp"])))
    return out


def choose_patches(candidates: Sequence[_Pick], n: int = PATCHES_PER_CLUSTER) -> list[_Pick]:
    """Up to `n` exemplars: the nearest of each slide first, then of each region not yet shown, then the rest;
    returned nearest first."""
    ranked = sorted(candidates, key=lambda p: (p.d2, p.slide, p.region, p.x, p.y))
    chosen: list[_Pick] = []
    for rule in ("slide", "region", "any"):
        for p in ranked:
            if len(chosen) >= n:
                break
            if p in chosen or (rule == "slide" and any(c.slide == p.slide for c in chosen)) or (
                    rule == "region" and any((c.slide, c.region) == (p.slide, p.region) for c in chosen)):
                continue
            chosen.append(p)
    return sorted(chosen, key=lambda p: p.d2)


def _finite(value: object) -> float:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def mean_colours(slides: Sequence[Mapping[str, Any]], k: int) -> tuple[list[tuple[int, int, int] | None], list[float]]:
    """Each cluster's mean RGB over the run (area-weighted over the biomarker rows; None: nowhere) and its share of
    the run's clustered tissue."""
    area = np.zeros(k)
    rgb = np.zeros((k, 3))
    for s in slides:
        if s.get("status") not in ("done", "skipped"):
            continue
        for row in s.get("regions") or []:
            for i in range(k):
                a = _finite(row.get(f"c{i + 1}_area_um2"))
                if a > 0:
                    area[i] += a
                    rgb[i] += a * np.array([_finite(row.get(f"c{i + 1}_mean_{c}")) for c in "rgb"])
    total = area.sum()
    colours: list[tuple[int, int, int] | None] = []
    for i in range(k):
        r, g, b = (int(round(v)) for v in rgb[i] / max(area[i], 1e-12))
        colours.append((r, g, b) if area[i] > 0 else None)
    return colours, [float(a / total) if total > 0 else 0.0 for a in area]


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    """`text` shortened with '…' in the middle to fit `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    keep = len(text)
    while keep > 2:
        keep -= 1
        short = text[: (keep + 1) // 2] + "…" + text[len(text) - keep // 2:]
        if draw.textlength(short, font=font) <= width:
            return short
    return "…"


def _read_patches(picks: Mapping[int, Sequence[_Pick]], options: RunOptions) -> dict[_Pick, np.ndarray]:
    """Each chosen patch, `PATCH_UM` µm at the run's --target-mpp around its cell centre; each slide opened once.
    A slide that cannot be reopened (moved, deleted) gives no patches, with a log warning."""
    target = options.segment.target_mpp
    side = max(8, round(PATCH_UM / target))
    by_path: dict[tuple[str, float], list[_Pick]] = {}
    for ps in picks.values():
        for p in ps:
            by_path.setdefault((p.path, p.mpp), []).append(p)
    out: dict[_Pick, np.ndarray] = {}
    for (path, mpp), ps in by_path.items():
        try:
            with open_slide(path, backend=options.regions.backend, mpp=mpp) as slide:
                half = side / 2 * target / slide.mpp  # level-0 px
                for p in ps:
                    out[p] = slide.read_region(p.x - half, p.y - half, side, side, target)
        except Exception as exc:  # a key without one slide's patches is still a key
            log.warning("%s: no cluster-key patches from this slide (%s)", path, exc)
    return out


def _title(options: RunOptions, kmeans_model: str | None, n_slides: int, n_regions: int) -> tuple[str, str]:
    mode = options.clustering
    if kmeans_model is not None and mode == "run" and not Path(kmeans_model).name.startswith("run-kmeans"):
        how = f"one saved model ({Path(kmeans_model).name}): Cluster i is the same tissue type in every core"
    elif kmeans_model is not None or mode == "run":
        how = "one model for the run: Cluster i is the same tissue type in every core and slide"
    elif mode == "slide":
        how = "clusters are per slide: Cluster i is only each slide's i-th darkest"
    else:
        how = "clusters are per region: Cluster i is only each region's i-th darkest"
    sub = (f"{n_slides} slide(s), {n_regions} region(s). Patches: {PATCH_UM:g} um at {options.segment.target_mpp:g} "
           "um/px around the cells nearest each cluster's centre (nearest first), from different slides and "
           "regions where possible.")
    return f"Cluster key - {how}", sub


def cluster_key_picture(slides: Sequence[Mapping[str, Any]], options: RunOptions, k: int,
                        kmeans_model: str | None = None) -> Image.Image:
    """The key for a run whose slides' records are `slides` (as in the manifest) and whose clusters number `k`."""
    names = list(options.cluster_names) or [cluster_class_name(i + 1) for i in range(k)]
    colours, shares = mean_colours(slides, k)
    candidates = _candidates(slides, k)
    picks = {i: choose_patches(candidates[i]) for i in candidates}
    patches = _read_patches(picks, options)
    done = [s for s in slides if s.get("status") in ("done", "skipped")]
    n_regions = len({(s["name"], e["region"]) for s in done for e in s.get("exemplars") or []})
    title, sub = _title(options, kmeans_model, len(done), n_regions)
    single = {str(s["name"]): len(s.get("regions") or []) for s in done}  # slides of one region: captioned by name
    row_h = PATCH_PX + CAPTION_H + PAD
    width = INFO_W + PATCHES_PER_CLUSTER * (PATCH_PX + PAD) + PAD
    canvas = Image.new("RGB", (width, TITLE_H + k * row_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = _font(15), _font(11)
    draw.text((PAD, 6), _fit(draw, title, width - 2 * PAD, big), fill=(0, 0, 0), font=big)
    draw.text((PAD, 26), _fit(draw, sub, width - 2 * PAD, small), fill=(80, 80, 80), font=small)
    for i in range(k):
        y = TITLE_H + i * row_h
        _info(draw, (PAD, y), cluster_color(i), names[i], colours[i], shares[i], big, small)
        for j, p in enumerate(picks[i + 1]):
            x = INFO_W + j * (PATCH_PX + PAD)
            caption = p.slide if single.get(p.slide, 0) <= 1 else f"{p.slide} / {p.region}"
            _patch(canvas, draw, (x, y), patches.get(p), cluster_color(i), caption, small)
        if not picks[i + 1]:
            draw.text((INFO_W, y + PATCH_PX // 2), "no exemplar cells recorded", fill=(120, 120, 120), font=small)
    return canvas


def _info(draw: ImageDraw.ImageDraw, at: tuple[int, int], palette: tuple[int, int, int], name: str,
          mean: tuple[int, int, int] | None, share: float, big: Any, small: Any) -> None:
    x, y = at
    draw.rectangle([x, y + 4, x + 22, y + 26], fill=palette, outline=(0, 0, 0))
    draw.text((x + 30, y + 7), _fit(draw, name, INFO_W - x - 40, big), fill=(0, 0, 0), font=big)
    draw.text((x, y + 40), "mean colour", fill=(80, 80, 80), font=small)
    if mean is not None:
        draw.rectangle([x, y + 56, x + 60, y + 96], fill=mean, outline=(0, 0, 0))
        draw.text((x + 70, y + 58), f"RGB {mean[0]}, {mean[1]}, {mean[2]}", fill=(0, 0, 0), font=small)
    else:
        draw.text((x, y + 58), "absent from every region", fill=(120, 120, 120), font=small)
    draw.text((x + 70, y + 78), f"{100 * share:.1f} % of the tissue", fill=(0, 0, 0), font=small)


def _patch(canvas: Image.Image, draw: ImageDraw.ImageDraw, at: tuple[int, int], pixels: np.ndarray | None,
           palette: tuple[int, int, int], caption: str, font: Any) -> None:
    x, y = at
    if pixels is None:
        draw.rectangle([x, y, x + PATCH_PX - 1, y + PATCH_PX - 1], fill=_GREY)
        draw.text((x + 8, y + PATCH_PX // 2 - 6), "slide not readable", fill=(120, 120, 120), font=font)
    else:
        tile = Image.fromarray(np.ascontiguousarray(pixels[..., :3])).resize((PATCH_PX, PATCH_PX),
                                                                             Image.Resampling.LANCZOS)
        canvas.paste(tile, (x, y))
        c, r = x + PATCH_PX // 2, y + PATCH_PX // 2  # ticks at the exemplar cell's centre, clear of the tissue
        for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):  # outlined bars, to show on any tissue
            xa, xb, ya, yb = sorted((c + dx * 9, c + dx * 18)) + sorted((r + dy * 9, r + dy * 18))
            box = [xa, r - 2, xb, r + 2] if dx else [c - 2, ya, c + 2, yb]
            draw.rectangle(box, fill=palette, outline=(0, 0, 0))
    draw.rectangle([x - 2, y - 2, x + PATCH_PX + 1, y + PATCH_PX + 1], outline=palette, width=2)
    draw.text((x, y + PATCH_PX + 4), _fit(draw, caption, PATCH_PX, font), fill=(0, 0, 0), font=font)


def write_cluster_key(out_dir: str | os.PathLike[str], slides: Sequence[Mapping[str, Any]], options: RunOptions,
                      kmeans_model: str | None = None) -> Path | None:
    """Draw `OUT/cluster_key.png` from the slides' records; None (and an earlier run's key removed) when no slide
    was segmented. K is the clusters of the rows (`n_clusters` of the options when there are none)."""
    path = Path(out_dir) / CLUSTER_KEY_NAME
    path.unlink(missing_ok=True)  # an earlier run's key would pass for this one's
    done = [s for s in slides if s.get("status") in ("done", "skipped") and s.get("regions")]
    if not done:
        return None
    k = _run_k(done) or options.segment.n_clusters
    if options.cluster_names and len(options.cluster_names) != k:
        options = _without_names(options)
    save_png(path, cluster_key_picture(done, options, k, kmeans_model))
    return path


def _run_k(slides: Sequence[Mapping[str, Any]]) -> int:
    ks = [int(_finite(row.get("n_clusters"))) for s in slides for row in s.get("regions") or []]
    return max(ks, default=0)


def _without_names(options: RunOptions) -> RunOptions:
    from dataclasses import replace

    return replace(options, cluster_names=())
