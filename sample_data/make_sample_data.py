"""Regenerate every derived file of sample_data/ from the CC0 slide `CMU-1-Small-Region.svs`.

Run from anywhere: `python sample_data/make_sample_data.py`. It reads `sample_data/CMU-1-Small-Region.svs`
(or `../shared/data/CMU-1-Small-Region.svs` when the copy is missing, and then copies it here) and writes
`cores/slideNNN_coreNNN.jpg` (Gleason 2019-style cores: circular crops of the region pasted on white, JPEG
quality 90) and `cores/manifest.csv` (path, slide, core, mpp; plain JPEGs carry no resolution).
Deterministic: same input and library versions give byte-identical files.

`slide002_core002` is a damaged core: only the part of the disc below a chord holds tissue (taken from a
fully covered area), so its true tissue fraction is known by construction (`TRUE_TISSUE_FRACTION`).
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SOURCE_NAME = "CMU-1-Small-Region.svs"
MPP = 0.499  # µm/px of the CC0 region (aperio.MPP)
MARGIN = 48  # white border around each disc, px
QUALITY = 90

# name: (centre x, centre y, diameter) in level-0 px of the CC0 region, and an optional chord: tissue only
# where y >= centre y + chord offset (a partly lost core).
CORES: dict[str, tuple[int, int, int, int | None]] = {
    "slide001_core001": (1150, 2150, 900, None),
    "slide001_core002": (1250, 1150, 800, None),
    "slide002_core001": (850, 2500, 1000, None),
    "slide002_core002": (1250, 2450, 760, 150),
}


def _disc(size: int, diameter: int, chord: int | None) -> np.ndarray:
    """Boolean mask of a centred disc of `diameter` in a `size` square, cut above `chord` px below centre."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    inside = (xx - c) ** 2 + (yy - c) ** 2 <= (diameter / 2) ** 2
    if chord is not None:
        inside &= yy >= c + chord
    return inside


def true_fraction(diameter: int, chord: int | None) -> float:
    """Share of the square image covered by the pasted tissue, analytically (disc or circular segment)."""
    r = diameter / 2
    size = diameter + 2 * MARGIN
    if chord is None:
        area = math.pi * r * r
    else:
        d = chord
        area = r * r * math.acos(d / r) - d * math.sqrt(r * r - d * d)
    return area / (size * size)


# Known only where the tissue was placed by construction (the damaged core).
TRUE_TISSUE_FRACTION = {name: true_fraction(spec[2], spec[3]) for name, spec in CORES.items() if spec[3] is not None}


def source_path() -> Path:
    local = HERE / SOURCE_NAME
    if not local.exists():
        shared = HERE.parent.parent / "shared" / "data" / SOURCE_NAME
        shutil.copyfile(shared, local)
    return local


def make_cores(out_dir: Path | None = None) -> list[Path]:
    """Write the core JPEGs and manifest.csv into `out_dir` (default sample_data/cores)."""
    import tiffslide

    out = out_dir or HERE / "cores"
    out.mkdir(parents=True, exist_ok=True)
    with tiffslide.TiffSlide(source_path()) as slide:
        region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions, as_array=True))[..., :3]
    written = []
    rows = []
    for name, (cx, cy, diameter, chord) in CORES.items():
        size = diameter + 2 * MARGIN
        x0, y0 = cx - size // 2, cy - size // 2
        crop = np.full((size, size, 3), 255, np.uint8)
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + size, region.shape[1]), min(y0 + size, region.shape[0])
        crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = region[sy0:sy1, sx0:sx1]
        inside = _disc(size, diameter, chord)
        core = np.where(inside[..., None], crop, np.uint8(255))
        path = out / f"{name}.jpg"
        Image.fromarray(core).save(path, format="JPEG", quality=QUALITY)
        written.append(path)
        slide_name, core_name = name.split("_")
        rows.append({"path": path.name, "slide": slide_name, "core": core_name, "mpp": MPP})
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "slide", "core", "mpp"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return written


if __name__ == "__main__":
    for p in make_cores():
        print(p.relative_to(HERE), f"{p.stat().st_size / 1e3:.0f} kB")
    print("true tissue fraction of the damaged core:", round(TRUE_TISSUE_FRACTION["slide002_core002"], 4))
