"""Write Aperio-style pyramidal TIFF files that both tiffslide and OpenSlide open.

Used to build test slides, benchmark slides and the sample TMA from real tissue: page 0 is the tiled
base level, page 1 a small stripped thumbnail (the Aperio convention readers rely on), then one tiled page
per 2x level. The MPP in the ImageDescription is what both readers report as the resolution.
"""

from __future__ import annotations

import os

import numpy as np
import tifffile
from PIL import Image


def pyramid_levels(rgb: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Level i is the 2x2 mean of level i-1 (odd edges dropped), like a scanner's pyramid."""
    levels = [np.ascontiguousarray(rgb)]
    for _ in range(1, n_levels):
        prev = levels[-1]
        if min(prev.shape[:2]) < 2:
            break
        levels.append(np.asarray(Image.fromarray(prev).reduce(2)))
    return levels


def write_aperio_pyramid(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    mpp: float,
    n_levels: int = 3,
    tile: int = 256,
    quality: int = 90,
    app_mag: int = 20,
) -> None:
    """Write `rgb` (H, W, 3 uint8) as an Aperio SVS-style pyramid with resolution `mpp` µm/px."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("rgb must be an (H, W, 3) uint8 array")
    height, width = rgb.shape[:2]
    description = (
        f"Aperio Image Library v12.0.0 \n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
        f"JPEG/RGB Q={quality}|AppMag = {app_mag}|MPP = {mpp}"
    )
    levels = pyramid_levels(rgb, n_levels)
    thumb_factor = max(1, max(height, width) // 512)
    thumbnail = np.asarray(Image.fromarray(rgb).reduce(thumb_factor)) if thumb_factor > 1 else rgb
    options = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": quality}, "metadata": None}
    with tifffile.TiffWriter(path) as writer:
        writer.write(levels[0], tile=(tile, tile), description=description, **options)
        writer.write(thumbnail, description=f"Aperio Image Library v12.0.0 \n{width}x{height} -> thumbnail", **options)
        for level in levels[1:]:
            writer.write(level, tile=(tile, tile), description=description, **options)
