"""Open any slide or core image and read it at a target resolution in µm/px.

One `Slide` API over three readers (in `slide_readers`): tiffslide (default for pyramidal TIFF/SVS/NDPI...),
OpenSlide through openslide-python + openslide-bin (MRXS, and where tiffslide fails) and a plain-image reader
(JPEG/PNG cores through Pillow, plain TIFF through tifffile). Coordinates are level-0 pixels, x right, y down.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from equiseg_wsi.errors import MppUnknownError, SlideError, one_line
from equiseg_wsi.slide_readers import READERS, WHITE, ArrayReader, Level, Reader

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tiffslide", "openslide", "image")
PLAIN_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
# DICOM whole-slide images (read by OpenSlide >= 4): one slide is a series of files, one per level or tile set.
DICOM_SUFFIXES = {".dcm", ".dicom"}
# Glass of a bright-field scan is grey to white: its strongest and weakest channel differ by a few grey levels
# (10-20 with a scanner tint). More than this, and the pixels were most likely decoded in the wrong colour space.
GLASS_MAX_CHROMA = 40
# A resolution outside this range is a placeholder (e.g. 72 dpi written by image editors), not a scan.
PLAUSIBLE_MPP = (0.01, 50.0)
# Largest level-space window read in one piece; larger reads are split so memory stays bounded.
MAX_READ_SIDE = 4096


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


def _whole_block_mean(raw: np.ndarray, box: tuple[float, float, float, float], factor: float, width: int,
                      height: int) -> np.ndarray | None:
    """Downscaling by a whole factor on whole pixels: the exact mean of each n x n block (rounded half up), or
    None when the read is not that case. Why: PIL's two separable passes round in between, so a turned image
    resized by PIL differs from the resized image turned by one grey level here and there, enough to move a
    tissue-mask pixel; a block mean is the same in every orientation."""
    n = round(factor)
    if n < 2 or abs(factor - n) > 1e-9 or any(abs(b - round(b)) > 1e-9 for b in box):
        return None
    bx, by = int(round(box[0])), int(round(box[1]))
    block = raw[by : by + height * n, bx : bx + width * n]
    if block.shape[:2] != (height * n, width * n):
        return None
    sums = block.reshape(height, n, width, n, block.shape[2]).sum(axis=(1, 3), dtype=np.uint32)
    mean: np.ndarray = ((sums + (n * n) // 2) // (n * n)).astype(np.uint8)
    return mean


def _auto_order(path: Path) -> list[str]:
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        return ["image"]
    if path.suffix.lower() in DICOM_SUFFIXES:
        return ["openslide"]
    return ["tiffslide", "openslide", "image"]


# -- DICOM series --------------------------------------------------------------------------------------------


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """A DICOM file by its suffix (.dcm, .dicom)."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def find_dicom_files(folder: str | os.PathLike[str]) -> list[Path]:
    """DICOM files directly in `folder` (not recursive, hidden files skipped), sorted by name."""
    root = Path(folder)
    found = [p for p in root.iterdir() if is_dicom(p) and not p.name.startswith(".") and p.is_file()]
    return sorted(found, key=lambda p: p.name)


def slide_key(path: str | os.PathLike[str]) -> tuple[str, str]:
    """What identifies the slide a file belongs to: every file of one DICOM WSI series (same folder, same
    SeriesInstanceUID, as OpenSlide groups them) gives the same key; any other file is its own slide."""
    p = Path(path)
    resolved = p.resolve()
    if is_dicom(p):
        uid = dicom_series_uid(resolved)
        if uid is not None:
            return (str(resolved.parent), f"dicom-series:{uid}")
    return (str(resolved), "")


def slide_stem(path: str | os.PathLike[str]) -> str:
    """A slide's name from its path: the file name up to its first dot, or, for a DICOM WSI (a series of
    files), the name of its folder."""
    p = Path(path)
    if is_dicom(p):
        return p.resolve().parent.name or p.name.split(".")[0]
    return p.name.split(".")[0]


def dicom_series_uid(path: str | os.PathLike[str]) -> str | None:
    """The SeriesInstanceUID of a DICOM whole-slide file as OpenSlide reads it; None when OpenSlide cannot open
    it (not a slide, damaged)."""
    try:
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            uid = slide.properties.get("dicom.SeriesInstanceUID")
    except Exception:  # openslide raises its own types; the file is then simply not part of a series
        return None
    return str(uid) if uid else None


def _dicom_in_folder(folder: Path) -> Path:
    """The file to open for a folder that holds one DICOM WSI series (OpenSlide finds the others itself)."""
    files = find_dicom_files(folder)
    if not files:
        raise SlideError(f"{folder}: is a folder, not a slide file")
    series = {slide_key(f) for f in files}
    if len(series) > 1:
        raise SlideError(f"{folder}: holds {len(series)} DICOM series; name one file of the slide you mean")
    return files[0]


# -- glass colour --------------------------------------------------------------------------------------------


def glass_colour(rgb: np.ndarray) -> tuple[int, int, int] | None:
    """The colour of the empty glass in an RGB image: the median of its brightest tenth of pixels, when those
    are flat like glass (each channel's median absolute deviation at most 8 grey levels); None when the image
    shows no glass (tissue to the edges) or has too few pixels to tell."""
    pixels = np.asarray(rgb, dtype=np.int32).reshape(-1, 3)
    if len(pixels) < 100:
        return None
    brightness = pixels.sum(axis=1)
    top = pixels[brightness >= np.percentile(brightness, 90)]
    median = np.median(top, axis=0)
    if np.median(np.abs(top - median), axis=0).max() > 8:
        return None
    r, g, b = (int(round(v)) for v in median)
    return r, g, b


def _ycbcr_to_rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    y, cb, cr = colour[0], colour[1] - 128.0, colour[2] - 128.0
    return y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb


def glass_colour_warning(rgb: np.ndarray, where: str | os.PathLike[str]) -> str | None:
    """A one-line warning when the glass of `rgb` is far from neutral grey/white, naming the likely cause; None
    when it is neutral or the image shows no glass."""
    colour = glass_colour(rgb)
    if colour is None or max(colour) - min(colour) <= GLASS_MAX_CHROMA:
        return None
    converted = _ycbcr_to_rgb(colour)
    text = (f"{where}: the glass reads as RGB {colour}, far from neutral grey/white, so colours and colour "
            "biomarkers are likely wrong; likely cause: ")
    if max(converted) - min(converted) <= 15 and min(converted) >= 150:
        return text + ("YCbCr pixel data labelled RGB (the colour space of its JPEG frames, as in some DICOM "
                       "exports); convert the slide to RGB before segmenting it")
    return text + "the colour space (YCbCr vs RGB, an ICC profile not applied) or the scanner's white balance"


def _short(exc: BaseException) -> str:
    text = one_line(exc)
    return text if len(text) <= 160 else text[:157] + "..."


class Slide:
    """An open slide or core image with one API whatever the reader."""

    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str | None

    def __init__(self, path: str | os.PathLike[str], backend: str = "auto", mpp: float | None = None) -> None:
        self.path = Path(path)
        if backend not in BACKENDS:
            raise SlideError(f"{self.path}: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if not self.path.exists():
            raise SlideError(f"{self.path}: no such file")
        if self.path.is_dir():  # a DICOM WSI folder is one slide; any other folder is refused
            self.path = _dicom_in_folder(self.path)
        if self.path.stat().st_size == 0:
            raise SlideError(f"{self.path}: empty file (0 bytes)")
        order = _auto_order(self.path) if backend == "auto" else [backend]
        failures: list[str] = []
        reader: Reader | None = None
        for name in order:
            try:
                with warnings.catch_warnings():  # decoders warn about the broken files we report anyway
                    warnings.simplefilter("ignore")
                    reader = READERS[name](self.path)
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
        slide._attach(ArrayReader(rgb, mpp), None)
        slide._glass_checked = True  # a copy of pixels already read (and checked) from their slide
        return slide

    def _attach(self, reader: Reader, mpp: float | None) -> None:
        self._reader = reader
        self.warnings: list[str] = []  # one line each, e.g. a glass colour far from neutral
        self._glass_checked = False
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
        block_mean = _whole_block_mean(raw, box, scale / d, width, height)
        if block_mean is not None:
            return block_mean
        resample = Image.Resampling.BOX if scale / d >= 1 else Image.Resampling.BICUBIC
        img = Image.fromarray(raw).resize((width, height), resample, box=box)
        return np.asarray(img)

    def read_full(self, mpp: float) -> np.ndarray:
        """The whole image at `mpp` µm/px (for thumbnails and tissue masks at coarse resolution)."""
        scale = mpp / self.mpp
        width = max(1, int(round(self.width / scale)))
        height = max(1, int(round(self.height / scale)))
        rgb = self.read_region(0.0, 0.0, width, height, mpp)
        self._check_glass(rgb)
        return rgb

    def check_glass(self) -> list[str]:
        """Read a thumbnail (unless the whole image was read already) and return `warnings`, which then say
        whether the glass looks far from neutral grey/white (a colour-space problem; see `glass_colour_warning`)."""
        if not self._glass_checked:
            level = next((i for i in range(len(self.levels) - 1, -1, -1)
                          if max(self.levels[i].width, self.levels[i].height) >= 256), 0)
            lv = self.levels[level]
            if lv.width * lv.height <= MAX_READ_SIDE * MAX_READ_SIDE:
                self._check_glass(self.read_level(level, 0, 0, lv.width, lv.height))
        return list(self.warnings)

    def checked_before(self, warnings: list[str]) -> None:
        """The glass was checked when this slide was opened before in the run (`warnings` as found then)."""
        self._glass_checked = True
        self.warnings.extend(w for w in warnings if w not in self.warnings)

    def _check_glass(self, rgb: np.ndarray) -> None:
        """Once per slide, on the first whole-image read: a line in `warnings` when the glass is not neutral."""
        if self._glass_checked:
            return
        self._glass_checked = True
        if self.backend not in ("tiffslide", "openslide"):  # Pillow decodes plain images in their own colour
            return  # space; their backgrounds are often camera-tinted or tissue, not glass
        message = glass_colour_warning(rgb, self.path)
        if message is not None:
            self.warnings.append(message)  # callers report it (a run: once per slide, in the manifest and on stderr)
            log.info("%s", message)

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
