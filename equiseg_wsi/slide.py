"""Open any slide or core image and read it at a target resolution in µm/px.

One `Slide` API over three readers: tiffslide (default for pyramidal TIFF/SVS/NDPI...), OpenSlide through
openslide-python + openslide-bin (MRXS, and where tiffslide fails) and a plain-image reader (JPEG/PNG cores
through Pillow, plain TIFF through tifffile). Coordinates are level-0 pixels, x right, y down.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from equiseg_wsi.errors import MppUnknownError, SlideError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tiffslide", "openslide", "image")
PLAIN_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
# A resolution outside this range is a placeholder (e.g. 72 dpi written by image editors), not a scan.
PLAUSIBLE_MPP = (0.01, 50.0)
# Largest level-space window read in one piece; larger reads are split so memory stays bounded.
MAX_READ_SIDE = 4096
WHITE = 255


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float


@dataclass
class SlideInfo:
    """What `equiseg info` reports about a slide; plain data, JSON-friendly."""

    path: str
    backend: str
    width: int
    height: int
    levels: list[Level]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str | None
    vendor: str | None
    bounds_offset: tuple[int, int]
    associated_images: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "backend": self.backend,
            "width": self.width,
            "height": self.height,
            "levels": [{"width": lv.width, "height": lv.height, "downsample": lv.downsample} for lv in self.levels],
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "mpp_source": self.mpp_source,
            "vendor": self.vendor,
            "bounds_offset": list(self.bounds_offset),
            "associated_images": list(self.associated_images),
        }


class _Reader:
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


class _TiffslideReader(_Reader):
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


class _OpenslideReader(_Reader):
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


class _ImageReader(_Reader):
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
        self._cache = (level, arr)
        return arr

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._decoded(level)[y : y + h, x : x + w]


class _ArrayReader(_Reader):
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


_READERS: dict[str, Callable[[Path], _Reader]] = {
    "tiffslide": _TiffslideReader,
    "openslide": _OpenslideReader,
    "image": _ImageReader,
}


def _auto_order(path: Path) -> list[str]:
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        return ["image"]
    return ["tiffslide", "openslide", "image"]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 160 else text[:157] + "..."


class Slide:
    """An open slide or core image with one API whatever the reader."""

    def __init__(self, path: str | os.PathLike[str], backend: str = "auto", mpp: float | None = None) -> None:
        self.path = Path(path)
        if backend not in BACKENDS:
            raise SlideError(f"{self.path}: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if not self.path.exists():
            raise SlideError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise SlideError(f"{self.path}: is a folder, not a slide file")
        if self.path.stat().st_size == 0:
            raise SlideError(f"{self.path}: empty file (0 bytes)")
        order = _auto_order(self.path) if backend == "auto" else [backend]
        failures: list[str] = []
        reader: _Reader | None = None
        for name in order:
            try:
                with warnings.catch_warnings():  # decoders warn about the broken files we report anyway
                    warnings.simplefilter("ignore")
                    reader = _READERS[name](self.path)
            except Image.DecompressionBombError as exc:
                raise SlideError(f"{self.path}: image too large to decode safely ({_short(exc)})") from exc
            except SlideError as exc:  # a damaged file is damaged for every reader: do not fall back
                raise SlideError(f"{self.path}: {exc}") from exc
            except Exception as exc:  # each backend raises its own types; we only need the reason
                failures.append(f"{name}: {_short(exc)}")
                continue
            if not reader.levels or reader.levels[0].width <= 0 or reader.levels[0].height <= 0:
                failures.append(f"{name}: no image data")
                reader.close()
                reader = None
                continue
            break
        if reader is None:
            raise SlideError(f"{self.path}: cannot open as a slide or image ({'; '.join(failures)})")
        if failures:
            log.info("%s: opened with %s after %s", self.path, reader.name, "; ".join(failures))
        self._attach(reader, mpp)

    @classmethod
    def from_array(cls, rgb: np.ndarray, mpp: float, name: str = "array") -> Slide:
        """An in-memory RGB image as a one-level slide (e.g. a rotated core in the robustness protocol)."""
        slide = cls.__new__(cls)
        slide.path = Path(name)
        slide._attach(_ArrayReader(rgb, mpp), None)
        return slide

    def _attach(self, reader: _Reader, mpp: float | None) -> None:
        self._reader = reader
        self.backend = reader.name
        self.levels = reader.levels
        self.vendor = reader.vendor
        self.bounds_offset = reader.bounds_xy
        self.associated_images = reader.associated
        mx, my = (m if m is not None and PLAUSIBLE_MPP[0] <= m <= PLAUSIBLE_MPP[1] else None for m in reader.mpp_xy)
        if mx is None and my is not None:
            mx = my
        if my is None and mx is not None:
            my = mx
        if mx is not None:
            self.mpp_x, self.mpp_y, self.mpp_source = mx, my, "metadata"
        elif mpp is not None:
            if not (PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]):
                raise SlideError(f"{self.path}: --mpp {mpp} is outside {PLAUSIBLE_MPP[0]}..{PLAUSIBLE_MPP[1]} µm/px")
            self.mpp_x, self.mpp_y, self.mpp_source = float(mpp), float(mpp), "user"
        else:
            self.mpp_x = self.mpp_y = self.mpp_source = None

    # -- metadata -------------------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def mpp(self) -> float:
        """Level-0 µm/px (mean of x and y); raises MppUnknownError rather than guessing."""
        if self.mpp_x is None or self.mpp_y is None:
            raise MppUnknownError(
                f"{self.path}: resolution (µm/px) unknown: the file has no usable mpp metadata; "
                "give it with --mpp or an 'mpp' column in the manifest"
            )
        return (self.mpp_x + self.mpp_y) / 2.0

    def info(self) -> SlideInfo:
        return SlideInfo(
            path=str(self.path),
            backend=self.backend,
            width=self.width,
            height=self.height,
            levels=list(self.levels),
            mpp_x=self.mpp_x,
            mpp_y=self.mpp_y,
            mpp_source=self.mpp_source,
            vendor=self.vendor,
            bounds_offset=self.bounds_offset,
            associated_images=list(self.associated_images),
        )

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is not coarser than `downsample` (level-0 px per output px)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * (1 + 1e-6) and lv.downsample > self.levels[best].downsample:
                best = i
        return best

    # -- pixels ---------------------------------------------------------------------------------------------
    def read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `level`, (lx, ly, w, h) in that level's pixels; outside reads as white."""
        lv = self.levels[level]
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + w, lv.width), min(ly + h, lv.height)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        try:
            part = self._reader.read(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
        except Exception as exc:
            raise SlideError(
                f"{self.path}: read failed at level {level} ({cx0},{cy0} {cx1 - cx0}x{cy1 - cy0}): {_short(exc)}"
            ) from exc
        out[cy0 - ly : cy0 - ly + part.shape[0], cx0 - lx : cx0 - lx + part.shape[1]] = part
        return out

    def read_region(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) at `mpp` µm/px whose top-left corner is level-0 point (x, y).

        Output pixel (r, c) covers level-0 [x + c*s, x + (c+1)*s) with s = mpp / slide mpp, so tiles read
        with this function form the same grid whatever pyramid level serves them. Downscaling averages
        pixel areas (antialiased); outside the image reads as white.
        """
        if width <= 0 or height <= 0:
            raise ValueError("width and height must be positive")
        scale = mpp / self.mpp
        level = self.best_level(scale)
        step = max(1, int(MAX_READ_SIDE * self.levels[level].downsample / scale))
        if width <= step and height <= step:
            return self._read_resampled(level, x, y, width, height, scale)
        out = np.empty((height, width, 3), dtype=np.uint8)
        for r0 in range(0, height, step):
            for c0 in range(0, width, step):
                h, w = min(step, height - r0), min(step, width - c0)
                out[r0 : r0 + h, c0 : c0 + w] = self._read_resampled(
                    level, x + c0 * scale, y + r0 * scale, w, h, scale
                )
        return out

    def _read_resampled(self, level: int, x: float, y: float, width: int, height: int, scale: float) -> np.ndarray:
        d = self.levels[level].downsample
        lx0, ly0 = x / d, y / d
        lx1, ly1 = lx0 + width * scale / d, ly0 + height * scale / d
        ix0, iy0 = math.floor(lx0) - 1, math.floor(ly0) - 1
        ix1, iy1 = math.ceil(lx1) + 1, math.ceil(ly1) + 1
        raw = self.read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        box = (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
        exact = abs(scale / d - 1) < 1e-9 and all(abs(b - round(b)) < 1e-9 for b in box)
        if exact:
            bx, by = int(round(box[0])), int(round(box[1]))
            return np.ascontiguousarray(raw[by : by + height, bx : bx + width])
        resample = Image.Resampling.BOX if scale / d >= 1 else Image.Resampling.BICUBIC
        img = Image.fromarray(raw).resize((width, height), resample, box=box)
        return np.asarray(img)

    def read_full(self, mpp: float) -> np.ndarray:
        """The whole image at `mpp` µm/px (for thumbnails and tissue masks at coarse resolution)."""
        scale = mpp / self.mpp
        width = max(1, int(round(self.width / scale)))
        height = max(1, int(round(self.height / scale)))
        return self.read_region(0.0, 0.0, width, height, mpp)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, {self.width}x{self.height}, mpp={self.mpp_x})"


def open_slide(path: str | os.PathLike[str], backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open `path` with `backend`; `mpp` (µm/px) is used only when the file carries no plausible resolution."""
    return Slide(path, backend=backend, mpp=mpp)
