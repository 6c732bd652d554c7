"""Files of a dearrayed TMA: the cores CSV, QuPath core annotations, the grid overview picture, and all of them.

Kept apart from the grid fitting in `equiseg_wsi.tma` so that fitting needs neither drawing nor file formats.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from shapely.geometry import Polygon

from equiseg_wsi.biomarkers import format_value, missing_region_row
from equiseg_wsi.export.geojson import object_id, qupath_feature, write_geojson
from equiseg_wsi.export.overlay import save_png
from equiseg_wsi.export.qptma import write_qptma
from equiseg_wsi.export.table import write_table

if TYPE_CHECKING:
    from equiseg_wsi.slide import Slide
    from equiseg_wsi.tma import TmaGrid

__all__ = ["CORE_CSV_COLUMNS", "core_features", "core_rows", "export_dearray", "render_grid", "with_missing_cores"]

#: Columns of the cores CSV, in order (row and column are 1-based: A-1 is row 1, column 1).
CORE_CSV_COLUMNS = (
    "name", "row", "column", "present", "bbox_x_px", "bbox_y_px", "bbox_width_px", "bbox_height_px",
    "centre_x_px", "centre_y_px", "diameter_um", "case_id",
)


def core_rows(grid: TmaGrid, case_ids: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One dict per grid position with `CORE_CSV_COLUMNS` (row/column 1-based, boxes in level-0 px)."""
    ids = case_ids or {}
    rows = []
    for c in grid.cores:
        x, y, w, h = c.bbox_level0
        rows.append(dict(zip(CORE_CSV_COLUMNS, (
            c.name, c.row + 1, c.col + 1, c.present, round(x, 2), round(y, 2), round(w, 2), round(h, 2),
            round(c.centre_level0[0], 2), round(c.centre_level0[1], 2), round(c.diameter_um, 2),
            str(ids.get(c.name, "")),
        ), strict=True)))
    return rows


def with_missing_cores(
    grid: TmaGrid, rows: Sequence[Mapping[str, Any]], identity: Callable[[str], Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The biomarker rows of a TMA slide with one row for every missing core added, in row-major grid order.

    `rows`: the measured rows (``region`` = core name); `identity(name)`: the identity columns of a core. A
    missing core's row has ``present`` False and empty measurements (`missing_region_row`); rows of regions that
    are not grid positions keep their place at the end. Without a measured row there is nothing to copy the
    columns from, and `rows` is returned as it is.
    """
    if not rows:
        return [dict(r) for r in rows]
    by_name = {str(r["region"]): r for r in rows}
    out: list[dict[str, Any]] = []
    for core in grid.cores:
        if core.name in by_name:
            out.append(dict(by_name.pop(core.name)))
        elif not core.present:
            out.append(missing_region_row(rows[0], identity(core.name)))
    out.extend(dict(r) for r in rows if str(r["region"]) in by_name)
    return out


def _ellipse(x: float, y: float, w: float, h: float, n: int = 72) -> Polygon:
    """The ellipse inscribed in box (x, y, w, h) as an `n`-gon: QuPath draws TMA cores as ellipses."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return Polygon(np.stack([x + w / 2 + w / 2 * np.cos(t), y + h / 2 + h / 2 * np.sin(t)], axis=1))


#: QuPath classes of core outlines (QuPath's own TMA colours: present cores light, missing ones dark red).
PRESENT_CLASS = ("TMA core", (80, 180, 80))
MISSING_CLASS = ("TMA core missing", (180, 60, 60))


def core_features(
    grid: TmaGrid, slide_name: str, case_ids: Mapping[str, str] | None = None, *, include_missing: bool = True,
) -> list[dict[str, Any]]:
    """QuPath annotations, one ellipse per core in its bounding box, named after the core (ids from uuid5).

    Missing positions (if included) get the class ``TMA core missing`` so they can be told apart or removed.
    """
    ids = case_ids or {}
    feats = []
    for c in grid.cores:
        if not c.present and not include_missing:
            continue
        cls, color = PRESENT_CLASS if c.present else MISSING_CLASS
        meta = {"core": c.name, "row": str(c.row + 1), "column": str(c.col + 1), "present": str(c.present).lower()}
        if ids.get(c.name):
            meta["case_id"] = str(ids[c.name])
        feats.append(qupath_feature(
            _ellipse(*c.bbox_level0), object_id=object_id(slide_name, "tma-core", c.name), name=c.name,
            class_name=cls, color=color,
            measurements={"Core diameter µm": round(c.diameter_um, 3), "Fragments": c.fragments},
            metadata=meta,
        ))
    return feats


def render_grid(grid: TmaGrid, rgb: np.ndarray, level0_per_px: float) -> Image.Image:
    """The thumbnail `rgb` (level-0 px per pixel given) with grid lines, core circles and names drawn.

    Present cores: green circle and name; missing positions: red dashed circle with a cross.
    """
    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("RGB")
    draw = ImageDraw.Draw(img)
    f = 1.0 / level0_per_px
    r_px = grid.diameter_um / grid.mask_mpp * grid.px_level0 * f / 2 if grid.mask_mpp else 10.0
    size = int(max(9, min(40, r_px * 0.45)))
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pts = {(c.row, c.col): (c.centre_level0[0] * f, c.centre_level0[1] * f) for c in grid.cores}
    line = (70, 110, 200)
    width = max(1, int(r_px / 25))
    for r in range(grid.n_rows):
        draw.line([pts[(r, c)] for c in range(grid.n_cols)], fill=line, width=width)
    for c in range(grid.n_cols):
        draw.line([pts[(r, c)] for r in range(grid.n_rows)], fill=line, width=width)
    for core in grid.cores:
        x, y, w, h = (v * f for v in core.bbox_level0)
        cx, cy = x + w / 2, y + h / 2
        if core.present:
            draw.ellipse([x, y, x + w, y + h], outline=(30, 160, 60), width=max(2, width * 2))
            color = (0, 90, 20)
        else:
            rr = max(w, h) / 2
            for k in range(0, 360, 30):  # dashed circle
                draw.arc([cx - rr, cy - rr, cx + rr, cy + rr], k, k + 15, fill=(200, 40, 40), width=max(2, width * 2))
            d = rr * 0.5
            draw.line([cx - d, cy - d, cx + d, cy + d], fill=(200, 40, 40), width=max(1, width))
            draw.line([cx - d, cy + d, cx + d, cy - d], fill=(200, 40, 40), width=max(1, width))
            color = (170, 20, 20)
        draw.text((cx, cy), core.name, fill=color, font=font, anchor="mm", stroke_width=2, stroke_fill=(255, 255, 255))
    return img


def export_dearray(
    grid: TmaGrid,
    slide: Slide,
    out_dir: str | os.PathLike[str],
    *,
    case_ids: Mapping[str, str] | None = None,
    thumbnail_px: int = 1600,
) -> dict[str, Path]:
    """Write ``<slide>.qptma``, ``<slide>_cores.geojson``, ``<slide>_cores.csv`` and ``<slide>_grid.png``.

    The overview is read from the slide with its long side at most `thumbnail_px` (never finer than level 0).
    Returns the paths by kind (qptma, geojson, csv, png).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(slide.path).stem
    paths = {
        "qptma": out / f"{stem}.qptma",
        "geojson": out / f"{stem}_cores.geojson",
        "csv": out / f"{stem}_cores.csv",
        "png": out / f"{stem}_grid.png",
    }
    write_qptma(paths["qptma"], grid.qptma_cores(case_ids), grid.n_cols, grid.n_rows)
    write_geojson(paths["geojson"], core_features(grid, Path(slide.path).name, case_ids))
    write_table(paths["csv"], core_rows(grid, case_ids), CORE_CSV_COLUMNS, format_cell=format_value)
    thumb_mpp = max(slide.mpp, max(slide.width, slide.height) * slide.mpp / max(thumbnail_px, 16))
    rgb = slide.read_full(thumb_mpp)
    picture = render_grid(grid, rgb, thumb_mpp / slide.mpp)
    # 256 colours (no dithering) keep the PNG ~3x smaller and are plenty for an overview.
    save_png(paths["png"], picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
    return paths
