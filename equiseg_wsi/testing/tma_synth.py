"""Synthetic TMA slides composed from real CC0 tissue, with known ground truth, for tests and demos.

Public TMA slides are large and rarely free, so the dearrayer is tested on slides built here: a grid of circular
cores whose texture is real H&E (`sample_data/CMU-1-Small-Region.svs`, CC0), with what makes real TMAs hard —
jittered positions and sizes, ragged core edges, missing cores, a rotated grid, uneven spacing, debris,
fragmented cores and partly filled cores (half-moons, cores cut by a straight edge, sparse cores whose tissue
covers only patches of the punch) — written as an Aperio-style pyramid (`write_aperio_pyramid`) that tiffslide
and OpenSlide both open, with the resolution in its metadata. The same seed gives the same slide and truth.

Run as a script to write one slide and its truth table (``OUT_truth.csv``)::

    python -m equiseg_wsi.testing.tma_synth OUT.svs --rows 3 --cols 4 --seed 7 --mpp 2 --rotation 3 --half 1

The truth of a partly filled core is still its punch: the centre and diameter of the full circle.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from equiseg_wsi.export.atomic import atomic_write_text
from equiseg_wsi.export.qptma import qupath_core_name
from equiseg_wsi.testing.slide_writer import write_aperio_pyramid

__all__ = ["DEFAULT_SOURCE", "PARTIAL_KINDS", "SynthCore", "SynthTma", "make_tma_slide", "main"]

#: The CC0 H&E region the core texture is cut from (0.499 µm/px, 2220 x 2967 px).
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "sample_data" / "CMU-1-Small-Region.svs"
# Glass colour of the source slide (median background) and the amplitude of a gentle illumination falloff.
GLASS_RGB = (246.0, 243.0, 243.0)
GLASS_SHADE = 4.0


#: Kinds of partly filled cores (`SynthCore.partial`): the share of the punch that keeps tissue.
PARTIAL_KINDS = ("half", "cut", "sparse")
#: Share of the punch's disc that keeps tissue, per kind (drawn uniformly in the range).
PARTIAL_KEEP = {"half": (0.4, 0.56), "cut": (0.63, 0.8), "sparse": (0.3, 0.45)}


@dataclass(frozen=True)
class SynthCore:
    """Truth for one grid position: centre in level-0 px (x, y) and punch diameter in µm.

    `partial`: "" for a whole core, else one of `PARTIAL_KINDS` (the centre and diameter are the punch's, not
    those of the tissue left); `tissue_fraction`: share of the punch's disc covered by tissue.
    """

    name: str
    row: int
    col: int
    present: bool
    centre_level0: tuple[float, float]
    diameter_um: float
    fragments: int = 1
    partial: str = ""
    tissue_fraction: float = 1.0


@dataclass
class SynthTma:
    """What was written: the slide file and the truth for every grid position (row-major)."""

    path: Path
    mpp: float
    n_rows: int
    n_cols: int
    rotation_deg: float
    spacing_um: tuple[float, float]
    diameter_um: float
    width: int
    height: int
    cores: list[SynthCore] = field(default_factory=list)
    debris_level0: list[tuple[float, float]] = field(default_factory=list)

    def core(self, name: str) -> SynthCore:
        """The truth of the core called `name`."""
        for c in self.cores:
            if c.name == name:
                return c
        raise KeyError(name)

    def write_truth_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the truth as CSV (row and column 1-based, like the cores CSV of `equiseg dearray`)."""
        lines = ["name,row,column,present,centre_x_px,centre_y_px,diameter_um,fragments,partial"]
        for c in self.cores:
            lines.append(
                f"{c.name},{c.row + 1},{c.col + 1},{str(c.present).lower()},{c.centre_level0[0]:.2f},"
                f"{c.centre_level0[1]:.2f},{c.diameter_um:.2f},{c.fragments if c.present else 0},{c.partial}"
            )
        return atomic_write_text(path, "\n".join(lines) + "\n")


@functools.lru_cache(maxsize=4)
def _source(path: str, mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source RGB at `mpp`, its tissue mask, and the (row, col) of every tissue pixel (cached per mpp)."""
    from equiseg_wsi.slide import open_slide
    from equiseg_wsi.tissue import tissue_mask

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: source tissue slide not found (pass source=...)")
    with open_slide(path) as slide:
        rgb = slide.read_full(max(mpp, slide.mpp))
    # Lumina and tears stay out of the texture: a core's outline should be the punch, not a hole at its edge.
    mask = tissue_mask(rgb, max(mpp, 0.5), min_area_um2=20_000.0, max_hole_um2=400.0, keep_lumina=True)
    # Stay off the ragged tissue border: a core's edge should be the punch, not the section's edge.
    inner = ndimage.binary_erosion(mask, iterations=2) if min(mask.shape) > 8 else mask
    coords = np.argwhere(inner if inner.any() else mask)
    return rgb, mask, coords


def _texture(rng: np.random.Generator, src: tuple[np.ndarray, np.ndarray, np.ndarray], h: int, w: int) -> np.ndarray:
    """An h x w patch covered with real tissue: pieces of the source (rotated/flipped) pasted until full."""
    rgb, mask, coords = src
    out = np.zeros((h, w, 3), np.uint8)
    filled = np.zeros((h, w), bool)
    for _ in range(60):
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        s_rgb, s_mask = np.rot90(rgb, k), np.rot90(mask, k)
        if flip:
            s_rgb, s_mask = s_rgb[:, ::-1], s_mask[:, ::-1]
        sh, sw = s_mask.shape
        # A random tissue pixel of the (transformed) source lands on a random pixel of the patch.
        r0, c0 = coords[int(rng.integers(len(coords)))]
        r0, c0 = _rot_flip_index(r0, c0, mask.shape, k, flip)
        tr, tc = int(rng.integers(h)), int(rng.integers(w))
        oy, ox = r0 - tr, c0 - tc  # source row/col of patch pixel (0, 0)
        y0, y1 = max(0, -oy), min(h, sh - oy)
        x0, x1 = max(0, -ox), min(w, sw - ox)
        if y1 <= y0 or x1 <= x0:
            continue
        sel = s_mask[y0 + oy : y1 + oy, x0 + ox : x1 + ox] & ~filled[y0:y1, x0:x1]
        out[y0:y1, x0:x1][sel] = s_rgb[y0 + oy : y1 + oy, x0 + ox : x1 + ox][sel]
        filled[y0:y1, x0:x1] |= sel
        if filled.all():
            return out
    if filled.any():  # whatever is left takes the colour of the nearest tissue pixel
        _, (iy, ix) = ndimage.distance_transform_edt(~filled, return_indices=True)
        out = out[iy, ix]
    return out


def _rot_flip_index(r: int, c: int, shape: tuple[int, int], k: int, flip: bool) -> tuple[int, int]:
    """Where pixel (r, c) of an array goes under np.rot90(., k) followed by an optional left-right flip."""
    h, w = shape
    for _ in range(k % 4):
        r, c, h, w = w - 1 - c, r, w, h
    if flip:
        c = w - 1 - c
    return int(r), int(c)


def _disc(shape: tuple[int, int], cy: float, cx: float, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A punched core: a disc whose edge wobbles by ~2% (real punches tear a little)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    phi = np.arctan2(dy, dx)
    wobble = np.zeros_like(phi)
    for k in range(3, 7):
        wobble += rng.uniform(0.002, 0.008) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    inside: np.ndarray = np.hypot(dy, dx) <= radius * (1 + wobble)
    return inside


def _fragment(inside: np.ndarray, gap_px: float, rng: np.random.Generator) -> list[tuple[np.ndarray, int, int]]:
    """Cut a core mask with one or two lines near its centre; pieces move apart by ~gap_px, centroid kept."""
    h, w = inside.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    n_cuts = int(rng.integers(1, 3))
    labels = np.zeros((h, w), np.int64)
    normals: list[tuple[float, float, float]] = []
    for i in range(n_cuts):
        a = rng.uniform(0, np.pi) if i == 0 else normals[0][2] + rng.uniform(np.pi / 3, 2 * np.pi / 3)
        n = np.array([math.cos(a), math.sin(a)])
        off = rng.uniform(-0.12, 0.12) * min(h, w) / 2
        side = ((xx - cx) * n[0] + (yy - cy) * n[1] - off) > 0
        labels = labels * 2 + side
        normals.append((n[0], n[1], a))
    pieces = []
    for lab in np.unique(labels[inside]):
        m = inside & (labels == lab)
        shift = np.zeros(2)
        for i, (nx, ny, _) in enumerate(normals):
            sign = 1.0 if (lab >> (n_cuts - 1 - i)) & 1 else -1.0
            shift += sign * gap_px / 2 * np.array([nx, ny])
        pieces.append((m, shift, float(m.sum())))
    total = sum(p[2] for p in pieces)
    mean = np.asarray(sum(p[1] * p[2] for p in pieces)) / total  # area-weighted: the union keeps the disc's centroid
    return [(m, int(round(s[0] - mean[0])), int(round(s[1] - mean[1]))) for m, s, _ in pieces]


def _partial_mask(inside: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The part of a punched core (`inside`, centred in its square) that keeps tissue, for a kind of partial core.

    half: a half-moon, one side of a chord near the centre; cut: a straight edge took a segment off one side;
    sparse: patches of tissue (smooth random blobs about a tenth of the core across) spread over the punch.
    """
    h, w = inside.shape
    lo, hi = PARTIAL_KEEP[kind]
    keep = rng.uniform(lo, hi)
    if kind == "sparse":
        noise = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=max(1.0, min(h, w) / 16))
        level = np.quantile(noise[inside], 1 - keep)
        out: np.ndarray = inside & (noise >= level)
        return out
    if kind not in ("half", "cut"):
        raise ValueError(f"partial core kind must be one of {PARTIAL_KINDS}, got {kind!r}")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a = rng.uniform(0, 2 * np.pi)
    along = (xx - (w - 1) / 2) * math.cos(a) + (yy - (h - 1) / 2) * math.sin(a)
    level = np.quantile(along[inside], 1 - keep)  # the chord that leaves exactly `keep` of the disc
    out = inside & (along >= level)
    return out


def _choose_missing(rng: np.random.Generator, rows: int, cols: int, n_missing: int) -> set[tuple[int, int]]:
    """Missing positions, never emptying the first/last row or column (those fix the grid's extent)."""
    missing: set[tuple[int, int]] = set()
    for i in rng.permutation(rows * cols):
        if len(missing) >= n_missing:
            break
        r, c = divmod(int(i), cols)
        trial = missing | {(r, c)}
        edges_ok = all(
            any((rr, cc) not in trial for cc in range(cols)) for rr in {0, rows - 1}
        ) and all(any((rr, cc) not in trial for rr in range(rows)) for cc in {0, cols - 1})
        if edges_ok:
            missing = trial
    return missing


def _nodes(
    rng: np.random.Generator, rows: int, cols: int, spacing: tuple[float, float], rotation_deg: float,
    jitter: float, core_diameter_um: float, size_jitter: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Core centres in µm around the grid centre (jittered, then rotated) and core diameters in µm, per node."""
    sx, sy = spacing
    theta = math.radians(rotation_deg)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    centres_um = np.zeros((rows, cols, 2))
    diam_um = np.zeros((rows, cols))
    for r in range(rows):
        for c in range(cols):
            gx, gy = (c - (cols - 1) / 2) * sx, (r - (rows - 1) / 2) * sy
            rad, ang = jitter * min(sx, sy) * math.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            gx, gy = gx + rad * math.cos(ang), gy + rad * math.sin(ang)
            centres_um[r, c] = (gx * cos_t - gy * sin_t, gx * sin_t + gy * cos_t)
            diam_um[r, c] = core_diameter_um * (1 + rng.uniform(-size_jitter, size_jitter))
    return centres_um, diam_um


def _missing_positions(
    rng: np.random.Generator, names: list[list[str]], missing: float | Sequence[str],
) -> set[tuple[int, int]]:
    """The (row, col) left empty: a random fraction of the grid, or the positions named in `missing`."""
    rows, cols = len(names), len(names[0])
    if isinstance(missing, (int, float)):
        return _choose_missing(rng, rows, cols, int(round(float(missing) * rows * cols)))
    wanted = set(missing)
    gone = {(r, c) for r in range(rows) for c in range(cols) if names[r][c] in wanted}
    unknown = wanted - {names[r][c] for r, c in gone}
    if unknown:
        raise ValueError(f"missing cores {sorted(unknown)} are not in the grid")
    return gone


def _glass(height: int, width: int) -> np.ndarray:
    """Empty glass with a smooth vignette: real scans are not flat white, and per-pixel noise would bloat the JPEG."""
    yy, xx = np.ogrid[0:height, 0:width]
    shade = GLASS_SHADE * (((xx / max(width, 1) - 0.5) ** 2 + (yy / max(height, 1) - 0.5) ** 2) * 2)
    canvas = np.clip(np.asarray(GLASS_RGB, np.float32) - shade[..., None].astype(np.float32), 0, 255)
    return canvas.astype(np.uint8)


def make_tma_slide(
    path: str | os.PathLike[str],
    rows: int = 3,
    cols: int = 4,
    *,
    seed: int = 0,
    mpp: float = 2.0,
    core_diameter_um: float = 600.0,
    spacing_um: float | tuple[float, float] | None = None,
    rotation_deg: float = 0.0,
    jitter: float = 0.1,
    size_jitter: float = 0.08,
    missing: float | Sequence[str] = 0.15,
    n_fragmented: int = 1,
    n_debris: int = 6,
    n_half: int = 0,
    n_cut: int = 0,
    n_sparse: int = 0,
    margin_um: float | None = None,
    row_labels: str | Sequence[str] | None = None,
    col_labels: str | Sequence[str] | None = None,
    source: str | os.PathLike[str] = DEFAULT_SOURCE,
    quality: int = 85,
    n_levels: int | None = None,
) -> SynthTma:
    """Write a synthetic TMA slide of `rows` x `cols` cores to `path` (Aperio SVS style); return its truth.

    `spacing_um`: centre-to-centre distance (one value or (x, y); default 1.5 x the diameter). `rotation_deg`:
    angle of the rows to the image x axis, positive = rows descend to the right (clockwise on screen). `jitter`:
    each core moves up to this fraction of the spacing; `size_jitter`: diameters vary by up to this fraction.
    `missing`: a fraction of positions, or the names of the positions to leave empty (the first/last row and
    column always keep a core when a fraction is given). `n_fragmented` present cores are broken in 2–4 pieces;
    `n_debris` small bits of tissue (40 µm to a quarter of a core) lie around, some near missing positions.
    `n_half`, `n_cut`, `n_sparse` present (unfragmented) cores are partly filled: a half-moon (40–56% of the
    punch), a core with a segment cut off by a straight edge (63–80% left), or sparse patches (30–45%). They are
    drawn from a second random stream, so adding them leaves the rest of the slide as it was.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {rows} x {cols}")
    if not mpp > 0 or not core_diameter_um > 0:
        raise ValueError("mpp and core_diameter_um must be positive")
    rng = np.random.default_rng(seed)
    sx, sy = (spacing_um, spacing_um) if isinstance(spacing_um, (int, float)) else (spacing_um or (0.0, 0.0))
    sx = float(sx) or 1.5 * core_diameter_um
    sy = float(sy) or 1.5 * core_diameter_um
    names = [[qupath_core_name(r, c, row_labels, col_labels) for c in range(cols)] for r in range(rows)]
    centres_um, diam_um = _nodes(rng, rows, cols, (sx, sy), rotation_deg, jitter, core_diameter_um, size_jitter)
    gone = _missing_positions(rng, names, missing)
    present = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in gone]
    frag_idx = rng.permutation(len(present))[: max(0, min(n_fragmented, len(present)))]
    fragmented = {present[int(i)] for i in frag_idx}
    partial = _choose_partial(np.random.default_rng([seed, 1]), present, fragmented, (n_half, n_cut, n_sparse))

    # Canvas in slide px, level 0 = the canvas.
    margin = margin_um if margin_um is not None else max(sx, sy) * 0.5
    lo = centres_um.reshape(-1, 2).min(axis=0) - core_diameter_um / 2 - margin
    hi = centres_um.reshape(-1, 2).max(axis=0) + core_diameter_um / 2 + margin
    width, height = (int(math.ceil(v)) for v in (hi - lo) / mpp)
    canvas = _glass(height, width)
    occupied = np.zeros((height, width), bool)
    src = _source(str(source), float(mpp))

    truth = _paste_cores(canvas, occupied, names, (centres_um - lo) / mpp, diam_um, mpp, gone, fragmented,
                         partial, src, rng)
    debris = _paste_debris(canvas, occupied, truth, n_debris, core_diameter_um / mpp, src, rng)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    levels = n_levels or max(1, min(4, int(math.log2(max(width, height) / 256)) + 1))
    write_aperio_pyramid(target, canvas, mpp=float(mpp), n_levels=levels, quality=quality)
    return SynthTma(
        path=target, mpp=float(mpp), n_rows=rows, n_cols=cols, rotation_deg=float(rotation_deg),
        spacing_um=(sx, sy), diameter_um=float(core_diameter_um), width=width, height=height, cores=truth,
        debris_level0=debris,
    )


def _paste_cores(canvas: np.ndarray, occupied: np.ndarray, names: list[list[str]], centres_px: np.ndarray,
                 diam_um: np.ndarray, mpp: float, gone: set[tuple[int, int]], fragmented: set[tuple[int, int]],
                 partial: dict[tuple[int, int], tuple[str, np.random.Generator]],
                 src: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator) -> list[SynthCore]:
    """Paste every present core onto the canvas (row-major, one random stream) and return the truth of all."""
    truth: list[SynthCore] = []
    for r in range(len(names)):
        for c in range(len(names[0])):
            cx, cy = centres_px[r, c]
            d_px = diam_um[r, c] / mpp
            is_present = (r, c) not in gone
            n_frag, kind, share = 0, partial.get((r, c), ("", None))[0], 1.0
            if is_present:
                n_frag, share = _paste_core(canvas, occupied, cx, cy, d_px, src, rng, (r, c) in fragmented,
                                            partial.get((r, c)))
            truth.append(SynthCore(names[r][c], r, c, is_present, (float(cx), float(cy)),
                                   float(diam_um[r, c]), n_frag, kind, round(share, 4) if is_present else 0.0))
    return truth


def _choose_partial(
    rng: np.random.Generator, present: list[tuple[int, int]], fragmented: set[tuple[int, int]],
    counts: tuple[int, int, int],
) -> dict[tuple[int, int], tuple[str, np.random.Generator]]:
    """Which present, unfragmented cores are partly filled: (row, col) -> (kind, the stream that shapes it)."""
    if not any(counts):
        return {}
    pool = [present[int(i)] for i in rng.permutation(len(present)) if present[int(i)] not in fragmented]
    kinds = [k for k, n in zip(PARTIAL_KINDS, counts, strict=True) for _ in range(max(0, n))]
    if len(kinds) > len(pool):
        raise ValueError(f"{len(kinds)} partly filled cores asked for, only {len(pool)} whole cores to make them of")
    return {pos: (kind, np.random.default_rng(rng.integers(2**63))) for pos, kind in zip(pool, kinds, strict=False)}


def _paste_core(
    canvas: np.ndarray, occupied: np.ndarray, cx: float, cy: float, d_px: float,
    src: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator, fragmented: bool,
    partial: tuple[str, np.random.Generator] | None = None,
) -> tuple[int, float]:
    """Paste one core centred at (cx, cy) px; returns the number of pieces written and the punch's share kept.

    A `partial` core (kind, its own random stream) keeps only part of the punch; the main stream `rng` is used
    exactly as for a whole core, so the rest of the slide does not change.
    """
    pad = int(math.ceil(d_px * 0.15)) + 2
    x0, y0 = int(math.floor(cx - d_px / 2)) - pad, int(math.floor(cy - d_px / 2)) - pad
    size = int(math.ceil(d_px)) + 2 * pad
    inside = _disc((size, size), cy - y0, cx - x0, d_px / 2, rng)
    tex = _texture(rng, src, size, size)
    share = 1.0
    if partial is not None:
        kept = _partial_mask(inside, partial[0], partial[1])
        share = float(kept.sum() / max(1, inside.sum()))
        inside = kept
    pieces = _fragment(inside, max(3.0, 0.07 * d_px), rng) if fragmented else [(inside, 0, 0)]
    n = 0
    for m, dx, dy in pieces:
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        ty, tx = ys + y0 + dy, xs + x0 + dx
        ok = (ty >= 0) & (ty < canvas.shape[0]) & (tx >= 0) & (tx < canvas.shape[1])
        canvas[ty[ok], tx[ok]] = tex[ys[ok], xs[ok]]
        occupied[ty[ok], tx[ok]] = True
        n += 1
    return n, share


def _paste_debris(
    canvas: np.ndarray, occupied: np.ndarray, truth: list[SynthCore], n: int, d_px: float,
    src: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator,
) -> list[tuple[float, float]]:
    """Small tissue bits (40 µm .. d/4) away from present cores; every third one sits on a missing position."""
    if n <= 0:
        return []
    h, w = occupied.shape
    away = ndimage.distance_transform_edt(~occupied) if occupied.any() else np.full((h, w), np.inf)
    missing = [c.centre_level0 for c in truth if not c.present]
    placed: list[tuple[float, float]] = []
    for i in range(n):
        size = rng.uniform(0.08, 0.25) * d_px
        for _ in range(200):
            if missing and i % 3 == 0:
                mx, my = missing[int(rng.integers(len(missing)))]
                cx, cy = mx + rng.uniform(-0.25, 0.25) * d_px, my + rng.uniform(-0.25, 0.25) * d_px
            else:
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            ix, iy = int(cx), int(cy)
            if 0 <= ix < w and 0 <= iy < h and away[iy, ix] > size + 0.08 * d_px:
                break
        else:
            continue
        a, b = size / 2, size / 2 * rng.uniform(0.4, 1.0)
        ang = rng.uniform(0, np.pi)
        half = int(math.ceil(a)) + 1
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
        u = xx * math.cos(ang) + yy * math.sin(ang)
        v = -xx * math.sin(ang) + yy * math.cos(ang)
        m = (u / a) ** 2 + (v / b) ** 2 <= 1
        tex = _texture(rng, src, 2 * half + 1, 2 * half + 1)
        ys, xs = np.nonzero(m)
        ty, tx = ys + iy - half, xs + ix - half
        ok = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        canvas[ty[ok], tx[ok]] = tex[ys[ok], xs[ok]]
        placed.append((float(cx), float(cy)))
    return placed


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a synthetic TMA slide and OUT_truth.csv next to it (silent on success)."""
    p = argparse.ArgumentParser(prog="python -m equiseg_wsi.testing.tma_synth", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output slide path (.svs)")
    p.add_argument("--rows", type=int, default=3, help="grid rows (default 3)")
    p.add_argument("--cols", type=int, default=4, help="grid columns (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--mpp", type=float, default=2.0, help="slide resolution, µm/px (default 2)")
    p.add_argument("--diameter", type=float, default=600.0, help="core diameter, µm (default 600)")
    p.add_argument("--spacing", type=float, default=None, help="centre spacing, µm (default 1.5 x diameter)")
    p.add_argument("--rotation", type=float, default=0.0, help="grid rotation, degrees clockwise (default 0)")
    p.add_argument("--jitter", type=float, default=0.1, help="position jitter, fraction of spacing (default 0.1)")
    p.add_argument("--missing", type=float, default=0.15, help="fraction of missing cores (default 0.15)")
    p.add_argument("--fragmented", type=int, default=1, help="number of fragmented cores (default 1)")
    p.add_argument("--debris", type=int, default=6, help="number of debris bits (default 6)")
    p.add_argument("--half", type=int, default=0, help="number of half-moon cores (default 0)")
    p.add_argument("--cut", type=int, default=0, help="number of cores with a segment cut off (default 0)")
    p.add_argument("--sparse", type=int, default=0, help="number of sparse, patchy cores (default 0)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    args = p.parse_args(argv)
    tma = make_tma_slide(
        args.out, args.rows, args.cols, seed=args.seed, mpp=args.mpp, core_diameter_um=args.diameter,
        spacing_um=args.spacing, rotation_deg=args.rotation, jitter=args.jitter, missing=args.missing,
        n_fragmented=args.fragmented, n_debris=args.debris, n_half=args.half, n_cut=args.cut,
        n_sparse=args.sparse, quality=args.quality,
    )
    tma.write_truth_csv(args.out.with_name(args.out.stem + "_truth.csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
