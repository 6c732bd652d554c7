"""The report's pictures: the overlays, grid and run PNGs and a slide read from its input, as downscaled JPEG
thumbnails embedded as base64 data URIs (or linked by relative path), each in a `<figure>`."""

from __future__ import annotations

import base64
import io
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from equiseg_wsi.export.report_data import Slide, esc

__all__ = ["THUMBNAIL_SIDE", "figure", "image_uri", "overlay_figures", "slide_thumbnail"]

THUMBNAIL_SIDE = 520  # px: a TMA's grid picture
SLIDE_THUMBNAIL_SIDE = 380  # px: any other slide as read from its input
OVERLAY_SIDE = 460  # px: the overlay of a slide with one region
SMALL_OVERLAY_SIDE = 300  # px: each overlay of a slide with several regions (TMA cores)
MANY_OVERLAY_SIDE = 220  # px: ... with more than MANY_REGIONS regions
MANY_REGIONS = 24
JPEG_QUALITY = 82
MAX_THUMBNAIL_READ_PX = 64_000_000  # a slide whose coarsest fitting level is larger gets no thumbnail


def image_uri(path: Path, side: int, crop_legend: Path | None = None, *, link: str | None = None
               ) -> tuple[str | None, str | None]:
    """A JPEG data URI of the picture at `path`, at most `side` px; or (None, why not); `link`: the relative
    URL to give instead (the picture is not read), when it exists. `crop_legend`: the
    region's label PNG, whose shape tells where an overlay's picture ends and its legend panel begins (the
    page draws the legend itself, legibly)."""
    if link is not None:
        return (urllib.parse.quote(link), None) if path.is_file() else (None, f"{path.name}: missing")
    try:
        with Image.open(path) as img:
            img.load()
            picture = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"{path.name}: cannot be read ({exc})"
    if crop_legend is not None:
        picture = _without_legend(picture, crop_legend)
    return _encode(picture, side), None


def _without_legend(overlay: Image.Image, labels: Path) -> Image.Image:
    """The overlay without the legend panel `render_overlay` puts on its right; the overlay unchanged when the
    split cannot be told for sure (the picture spans the full height and a white gap starts the panel)."""
    try:
        with Image.open(labels) as img:
            lw, lh = img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return overlay
    width = round(overlay.height * lw / lh) if lh else 0
    if not 0 < width <= overlay.width - 6:
        return overlay
    for pw in (width, width - 1, width + 1):  # the picture's width is rounded from the label grid
        gap = overlay.crop((pw, 0, pw + 6, overlay.height)).convert("L").getextrema()
        if gap[0] == 255:
            return overlay.crop((0, 0, pw, overlay.height))
    return overlay


def _encode(picture: Image.Image, side: int) -> str:
    picture = picture.copy()
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure(uri: str | None, caption: str, note: str | None = None) -> str:
    if uri is None:
        return (f'<figure><p class="note">{esc(note or "no picture")}</p><figcaption>{esc(caption)}</figcaption>'
                "</figure>")
    size = "" if uri.startswith("data:") else ' loading="lazy" style="max-width:300px"'
    return f'<figure><img src="{esc(uri)}"{size} alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def slide_thumbnail(folder: Path, s: Slide, from_source: bool, manifest: Mapping[str, Any]) -> str:
    grid = next((o for o in s.outputs if o.endswith("_grid.png")), None)
    if grid is not None:
        uri, note = image_uri(folder / grid, THUMBNAIL_SIDE, link=None if s.embed else grid)
        return figure(uri, "dearrayed grid (green: cores found, red: missing)", note)
    if not from_source or not s.embed:
        return ""
    backend = str(((manifest.get("options") or {}).get("regions") or {}).get("backend") or "auto")
    picture, note = _source_thumbnail(folder, s, backend)
    if picture is None:
        s.notes.append(f"no slide thumbnail: {note}")
        return ""
    return figure(_encode(picture, SLIDE_THUMBNAIL_SIDE), "slide, regions outlined")


def _source_thumbnail(folder: Path, s: Slide, backend: str) -> tuple[Image.Image | None, str]:
    """The slide read from its input at a coarse pyramid level, with each region's box and name drawn on it."""
    from equiseg_wsi.slide import open_slide  # the readers are heavy; only when a thumbnail is wanted

    try:
        with open_slide(s.path, backend=backend) as slide:
            levels = slide.levels
            level = max((i for i, lv in enumerate(levels) if max(lv.width, lv.height) >= SLIDE_THUMBNAIL_SIDE),
                        default=0)
            lv = levels[level]
            if lv.width * lv.height > MAX_THUMBNAIL_READ_PX:
                return None, f"{s.path}: no pyramid level small enough to read ({lv.width} x {lv.height} px)"
            rgb = slide.read_level(level, 0, 0, lv.width, lv.height)
            downsample = float(lv.downsample)
    except Exception as exc:  # every reader raises its own errors; the report only says why
        return None, f"{s.path}: cannot be read now ({type(exc).__name__}: {exc})"
    picture = Image.fromarray(rgb)
    factor = min(1.0, SLIDE_THUMBNAIL_SIDE / max(picture.size))
    picture = picture.resize((max(1, round(picture.width * factor)), max(1, round(picture.height * factor))),
                             Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(picture)
    for name, (x, y, w, h) in _region_boxes(folder, s):
        f = factor / downsample
        box = (x * f, y * f, (x + w) * f, (y + h) * f)
        draw.rectangle(box, outline=(31, 95, 168), width=2)
        draw.text((box[0] + 4, box[1] + 3), name, fill=(31, 95, 168))
    return picture, ""


def _region_boxes(folder: Path, s: Slide) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Each region's level-0 box (x, y, width, height) from its label PNG's placement text chunks."""
    boxes = []
    for output in s.outputs:
        if not output.endswith("_labels.png"):
            continue
        name = Path(output).name[: -len("_labels.png")]
        try:
            with Image.open(folder / output) as img:
                text = dict(getattr(img, "text", {}) or {})
                width, height = img.size
            x0, y0 = float(text["equiseg:x0_level0"]), float(text["equiseg:y0_level0"])
            cell = float(text["equiseg:cell_level0"])
        except (OSError, KeyError, ValueError):
            continue
        boxes.append((name, (x0, y0, width * cell, height * cell)))
    return boxes


def overlay_figures(folder: Path, s: Slide, *, inner: bool = False) -> str:
    overlays = [o for o in s.outputs if o.endswith("_overlay.png")]
    order = {r.get("region", ""): i for i, r in enumerate(s.rows)}
    overlays.sort(key=lambda o: (order.get(Path(o).name[: -len("_overlay.png")], len(order)), o))
    side = OVERLAY_SIDE if len(overlays) == 1 else SMALL_OVERLAY_SIDE if len(overlays) <= MANY_REGIONS \
        else MANY_OVERLAY_SIDE
    figures = []
    for o in overlays:
        region = Path(o).name[: -len("_overlay.png")]
        uri, note = image_uri(folder / o, side, crop_legend=folder / Path(o).parent / f"{region}_labels.png",
                               link=None if s.embed else o)
        figures.append(figure(uri, region, note))
    if not figures:
        return '<p class="note">no overlay</p>'
    return "".join(figures) if inner else f'<div class="gallery">{"".join(figures)}</div>'
