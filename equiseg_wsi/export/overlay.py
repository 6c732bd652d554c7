"""Pictures a person looks at: the tissue with translucent segment colours and a legend, and label maps."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from equiseg_wsi.export.atomic import atomic_write_bytes
from equiseg_wsi.export.png import png_bytes

RGB = tuple[int, int, int]


def label_image(labels: np.ndarray, colors: Sequence[RGB]) -> Image.Image:
    """The label map as a palette PNG: pixel values are the cluster ids (0 = background), shown in colour."""
    if labels.max(initial=0) > 255:
        raise ValueError("label maps with more than 255 clusters cannot be stored as 8-bit PNG")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = [255, 255, 255]
    for color in colors:
        palette.extend(int(c) for c in color)
    img.putpalette(palette + [0] * (768 - len(palette)))
    return img


def render_overlay(
    rgb: np.ndarray,
    labels: np.ndarray,
    colors: Sequence[RGB],
    names: Sequence[str],
    alpha: float = 0.45,
    title: str | None = None,
) -> Image.Image:
    """Blend segment colours over `rgb`; `labels` covers the same area at any (coarser) resolution."""
    height, width = rgb.shape[:2]
    up = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST))
    blend = _blend_table(colors, alpha)
    up = np.clip(up, 0, len(colors))  # a label beyond the palette would index past the table
    tinted = np.empty((height, width, 3), dtype=np.uint8)
    for ch in range(3):  # a lookup per pixel: 0.07 s for 1,300 px, not 0.41 s in float
        tinted[..., ch] = blend[up, rgb[..., ch], ch]
    return _with_legend(Image.fromarray(tinted), colors, names, title)


def _blend_table(colors: Sequence[RGB], alpha: float) -> np.ndarray:
    """(k + 1, 256, 3) uint8: row l, column v is channel value v blended with colour l (row 0: v unchanged)."""
    palette = np.array([(0, 0, 0), *colors], dtype=np.float32)
    values = np.arange(256, dtype=np.float32)[None, :, None]
    table = (1 - alpha) * values + alpha * palette[:, None, :]
    table[0] = values[0]
    return np.asarray(table.round().clip(0, 255), dtype=np.uint8)


def _with_legend(picture: Image.Image, colors: Sequence[RGB], names: Sequence[str], title: str | None) -> Image.Image:
    font = ImageFont.load_default()
    row, pad = 18, 8
    lines = ([title] if title else []) + list(names)
    text_width = max((int(font.getlength(t)) for t in lines), default=0)
    legend_w = pad * 3 + 14 + text_width
    canvas = Image.new("RGB", (picture.width + legend_w, max(picture.height, pad * 2 + row * len(lines))), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = picture.width + pad, pad
    if title:
        draw.text((x, y), title, fill=(0, 0, 0), font=font)
        y += row
    for color, name in zip(colors, names, strict=True):
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=tuple(int(c) for c in color), outline=(0, 0, 0))
        draw.text((x + 14 + pad, y + 2), name, fill=(0, 0, 0), font=font)
        y += row
    return canvas


def save_png(path: str | os.PathLike[str], image: Image.Image, text: Mapping[str, str] | None = None) -> None:
    """Deterministic PNG (no timestamps), written atomically; `text` goes into tEXt chunks (in key order)."""
    atomic_write_bytes(path, png_bytes(image, text))
