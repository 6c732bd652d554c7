"""The slide readers behind `Slide`: tiffslide, OpenSlide, plain images and in-memory arrays.

Each reader reports its pyramid levels, vendor, resolution and QuPath bounds offset, and reads raw level-space
windows as RGB uint8 (grey, 16-bit and alpha images converted here, alpha composited on white). Choosing a
reader, resampling to a target µm/px and reading outside the image are `Slide`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from equiseg_wsi import decoded_store
from equiseg_wsi.errors import SlideError

__all__ = ["READERS", "WHITE", "ArrayReader", "Level", "Reader"]

WHITE = 255


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in px and how many level-0 px one of its px spans."""

    width: int
    height: int
    downsample: float


class Reader:
    """What each backend provides: levels, metadata and raw RGB reads in level space."""

    name = ""
    levels: list[Level]
    vendor: str | None = None
    mpp_xy: tuple[float | None, float | None] = (None, None)
    bounds_xy: tuple[int, int] = (0, 0)
    associated: list[str]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at `level`; (x, y, w, h) in that level's pixels, inside its bounds."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _bounds(props: Any, prefix: str) -> tuple[int, int]:
    """QuPath crops to the bounds rectangle only when all four properties exist."""
    keys = [f"{prefix}.bounds-{k}" for k in ("x", "y", "width", "height")]
    values = [props.get(k) for k in keys]
    if any(v is None or v == "" for v in values):
        return (0, 0)
    return (int(float(values[0])), int(float(values[1])))


class _TiffslideReader(Reader):
    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(path)
        props = self._slide.properties
        self.levels = [
            Level(int(w), int(h), float(d))
            for (w, h), d in zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True)
        ]
        self.vendor = props.get("tiffslide.vendor")
        self.mpp_xy = (_float_or_none(props.get("tiffslide.mpp-x")), _float_or_none(props.get("tiffslide.mpp-y")))
        self.bounds_xy = _bounds(props, "tiffslide")
        self.associated = sorted(self._slide.associated_images)
        _check_not_truncated(self._slide.ts_tifffile, path)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # tiffslide truncates level-0 / downsample: the ceiling maps back to exactly (x, y).
        d = self.levels[level].downsample
        loc = (math.ceil(x * d - 1e-9), math.ceil(y * d - 1e-9))
        arr = self._slide.read_region(loc, level, (w, h), as_array=True)
        return _to_rgb(np.asarray(arr))

    def close(self) -> None:
        self._slide.close()


def _check_not_truncated(tif: Any, path: Path) -> None:
    """A cut-off download still has its header; its missing tiles would silently read as blank."""
    size = path.stat().st_size
    for page in tif.pages:
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
        if ends and max(ends) > size:
            raise SlideError(f"truncated file: image data runs to byte {max(ends)} but the file has {size} bytes")


class _OpenslideReader(Reader):
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        self.levels = [
            Level(int(w), int(h), float(d))
            for (w, h), d in zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True)
        ]
        self.vendor = props.get("openslide.vendor")
        self.mpp_xy = (_float_or_none(props.get("openslide.mpp-x")), _float_or_none(props.get("openslide.mpp-y")))
        self.bounds_xy = _bounds(props, "openslide")
        self.associated = sorted(self._slide.associated_images)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # OpenSlide divides level-0 coordinates by the real downsample; the nearest integer lands closest.
        # It gives non-premultiplied RGBA; composite on white like a bright-field background.
        d = self.levels[level].downsample
        loc = (int(round(x * d)), int(round(y * d)))
        return _to_rgb(np.asarray(self._slide.read_region(loc, level, (w, h))))

    def close(self) -> None:
        self._slide.close()


class _ImageReader(Reader):
    """Plain core images. JPEGs get virtual levels 1, 2, 4, 8 decoded at reduced size (DCT scaling)."""

    name = "image"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cache: tuple[int, np.ndarray] | None = None
        self.associated = []
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                height, width = int(page.shape[0]), int(page.shape[1])
                if width * height > 2 * (Image.MAX_IMAGE_PIXELS or 1 << 62):
                    raise SlideError(f"plain TIFF of {width} x {height} px is too large to decode at once")
                self.mpp_xy = _tiff_resolution_mpp(page)
                _check_not_truncated(tif, path)
            self._is_jpeg = False
        else:
            with Image.open(path) as img:
                width, height = img.size
                self._is_jpeg = img.format == "JPEG"
                dpi = img.info.get("dpi")
            mpp = 25400.0 / float(dpi[0]) if dpi and _float_or_none(dpi[0]) else None
            self.mpp_xy = (mpp, mpp)
        factors = (1, 2, 4, 8) if self._is_jpeg else (1,)
        self.levels = []
        for f in factors:
            lw, lh = math.ceil(width / f), math.ceil(height / f)
            if f > 1 and min(lw, lh) < 64:
                break
            self.levels.append(Level(lw, lh, width / lw))

    def _decoded(self, level: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == level:
            return self._cache[1]
        self._cache = None  # free the previous level before decoding another
        lv = self.levels[level]
        full_px = self.levels[0].width * self.levels[0].height
        kept = decoded_store.load(self._path, level, (lv.height, lv.width, 3), full_px)
        if kept is not None:  # decoded earlier in this run (the fit pass, another reader)
            self._cache = (level, kept)
            return kept
        if self._path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            arr = _to_rgb(tifffile.imread(self._path, key=0))
        else:
            with Image.open(self._path) as img:
                if self._is_jpeg and level > 0:
                    img.draft("RGB", (lv.width, lv.height))
                img.load()
                if img.size != (lv.width, lv.height):
                    img = img.resize((lv.width, lv.height), Image.Resampling.BOX)
                arr = _pil_to_rgb(img)
        decoded_store.save(self._path, level, arr, full_px)
        self._cache = (level, arr)
        return arr

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._decoded(level)[y : y + h, x : x + w]


class ArrayReader(Reader):
    """An RGB array already in memory, served like a one-level slide."""

    name = "array"

    def __init__(self, rgb: np.ndarray, mpp: float) -> None:
        self._rgb = _to_rgb(np.asarray(rgb))
        height, width = self._rgb.shape[:2]
        self.levels = [Level(width, height, 1.0)]
        self.mpp_xy = (float(mpp), float(mpp))
        self.associated = []

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._rgb[y : y + h, x : x + w]


def _tiff_resolution_mpp(page: Any) -> tuple[float | None, float | None]:
    """µm/px from TIFF resolution tags (centimetre or inch units)."""
    unit = page.tags.get("ResolutionUnit")
    unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit is not None else 2)
    out: list[float | None] = []
    for tag in ("XResolution", "YResolution"):
        t = page.tags.get(tag)
        if t is None or unit_um is None:
            out.append(None)
            continue
        num, den = t.value
        out.append(unit_um * den / num if num else None)
    return out[0], out[1]


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I"):  # 16-bit grey arrives as I;16 or I (int32 holding 0..65535)
        return _to_rgb(np.clip(np.asarray(img), 0, 65535).astype(np.uint16))
    if img.mode == "F":
        return _to_rgb(np.asarray(img, dtype=np.float32))
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        return _to_rgb(np.asarray(img.convert("RGBA")))
    return np.asarray(img.convert("RGB"))


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """Any grey/RGB/RGBA/16-bit array to RGB uint8; alpha composited on white."""
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer):
            arr = (arr.astype(np.float64) * (255.0 / np.iinfo(arr.dtype).max)).round().astype(np.uint8)
        else:
            arr = np.clip(arr.astype(np.float64) * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255)
            arr = arr.round().astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[-1]
    if channels == 1:
        return np.repeat(arr, 3, axis=-1)
    if channels == 2:  # grey + alpha
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=-1), arr[..., 1:]], axis=-1)
        channels = 4
    if channels >= 4:
        rgb = arr[..., :3].astype(np.uint16)
        alpha = arr[..., 3:4].astype(np.uint16)
        out = (rgb * alpha + WHITE * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


READERS: dict[str, Callable[[Path], Reader]] = {
    "tiffslide": _TiffslideReader,
    "openslide": _OpenslideReader,
    "image": _ImageReader,
}
