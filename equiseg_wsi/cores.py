"""One image = one core: names, folder listing, tissue masking and the per-core work of `equiseg preprocess`.

Gleason 2019 cores are JPEGs named `slideNNN_coreNNN.jpg`; any other name is still a core whose slide is the
file stem and whose core name is empty.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from equiseg_wsi.errors import EquisegError, InputError
from equiseg_wsi.export.atomic import atomic_path
from equiseg_wsi.export.table import write_table
from equiseg_wsi.slide import open_slide
from equiseg_wsi.tissue import DEFAULT_MAX_HOLE_UM2, DEFAULT_MIN_AREA_UM2, DEFAULT_TISSUE_MPP, detect_tissue

__all__ = [
    "IMAGE_SUFFIXES",
    "PREPROCESS_COLUMNS",
    "find_images",
    "masked_core",
    "parse_core_name",
    "preprocess_core",
    "write_preprocess_csv",
]

IMAGE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".jpg", ".jpeg", ".png",
)
PREPROCESS_COLUMNS = ("slide", "core", "path", "mask_path", "processed", "mpp", "tissue_fraction")
# JPEG quality of the masked core: visually lossless; 4:4:4 chroma so the mask edge does not bleed colour.
MASKED_JPEG_QUALITY = 95

_GLEASON = re.compile(r"^(slide\d+)_(core\d+)$", re.IGNORECASE)


def parse_core_name(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(slide, core) from a file name: `slide001_core007.jpg` -> ("slide001", "core007").

    The strings are kept as written (zero padding included) so they round-trip to file names; take the
    numbers with `int(slide[5:])` / `int(core[4:])`. Other names give (stem, "").
    """
    stem = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(path).stem
    match = _GLEASON.match(stem)
    if match:
        return match.group(1), match.group(2)
    return stem, ""


def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Supported slide/image files directly in `folder` (not recursive, hidden files skipped), sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    found = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.name)


def masked_core(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of `rgb` (h, w, 3) with every pixel outside `mask` (h, w) set to white, like bare glass."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    out = np.array(rgb, dtype=np.uint8, copy=True)
    out[~mask.astype(bool)] = 255
    return out


def upsample_mask(mask: np.ndarray, px_level0: float, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour mask at level 0: pixel (r, c) takes mask cell (floor((r+.5)/s), floor((c+.5)/s))."""
    rows = np.minimum(((np.arange(height) + 0.5) / px_level0).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) / px_level0).astype(np.int64), mask.shape[1] - 1)
    upsampled: np.ndarray = mask[rows[:, None], cols[None, :]]
    return upsampled


def _save_image(array: np.ndarray, path: Path) -> None:
    """Encode in memory, then publish atomically: no half-written image under its final name."""
    img = Image.fromarray(array)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in (".jpg", ".jpeg"):
            img.save(tmp, format="JPEG", quality=MASKED_JPEG_QUALITY, subsampling=0)
        else:
            img.save(tmp, format="PNG", compress_level=6)


def preprocess_core(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    backend: str = "auto",
    tissue_mpp: float = DEFAULT_TISSUE_MPP,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    max_hole_um2: float = DEFAULT_MAX_HOLE_UM2,
    image_format: str = "jpg",
) -> dict[str, Any]:
    """Mask one core image; write `<stem>_masked.<jpg|png>` and `<stem>_mask.png` (0/255) into `out_dir`.

    The mask is detected at `tissue_mpp` µm/px and upsampled (nearest) to the full resolution. `mpp` (µm/px)
    is used only when the file carries none. Returns the CSV row (`PREPROCESS_COLUMNS`). Raises EquisegError
    (SlideError, MppUnknownError, InputError) for a bad file.
    """
    if image_format not in ("jpg", "png"):
        raise InputError(f"image format must be jpg or png, got {image_format!r}")
    src = Path(path)
    out = Path(out_dir)
    slide_name, core_name = parse_core_name(src)
    stem = src.name[: -len(src.suffix)] if src.suffix else src.name
    with open_slide(src, backend=backend, mpp=mpp) as slide:
        slide_mpp = slide.mpp
        tissue = detect_tissue(slide, tissue_mpp, min_area_um2=min_area_um2, max_hole_um2=max_hole_um2)
        rgb = slide.read_region(0.0, 0.0, slide.width, slide.height, slide_mpp)
    mask = upsample_mask(tissue.mask, tissue.px_level0, rgb.shape[1], rgb.shape[0])
    try:
        out.mkdir(parents=True, exist_ok=True)
        masked_path = out / f"{stem}_masked.{image_format}"
        mask_path = out / f"{stem}_mask.png"
        _save_image(masked_core(rgb, mask), masked_path)
        _save_image(np.where(mask, 255, 0).astype(np.uint8), mask_path)
    except OSError as exc:
        raise EquisegError(f"{src}: cannot write outputs to {out} ({exc.strerror or exc})") from exc
    return {
        "slide": slide_name,
        "core": core_name,
        "path": str(src.resolve()),
        "mask_path": str(mask_path.resolve()),
        "processed": str(masked_path.resolve()),
        "mpp": round(slide_mpp, 6),
        "tissue_fraction": round(float(mask.mean()), 6),
    }


def write_preprocess_csv(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write the preprocess table (`PREPROCESS_COLUMNS`, one row per processed core) atomically."""
    table = list(rows)  # an error while producing rows is not a write error
    try:
        return write_table(path, table, PREPROCESS_COLUMNS)
    except OSError as exc:
        raise EquisegError(f"{path}: cannot write CSV ({exc.strerror or exc})") from exc
