"""Segment borders at tissue resolution: the feature-cell label map refined on the image itself.

Why: one feature cell is 8 network pixels (20 µm at 2.5 µm/px), so unrefined segment borders are staircases of
cells that cut through glands. Here the cell labels are upsampled to a finer pixel grid read from the slide, and
within about one cell of a border every pixel takes the cluster whose local mean colour is nearest to its own
(a one-step, local KMeans in colour, seeded by the CNN's clusters); away from borders the cells' labels stand,
and small pieces are merged afterwards like any small segment. Window sums in exact integer arithmetic and the
tie rule (the lower cluster id) commute with 90° rotations and flips, so refined maps rotate exactly with the
image; the tissue outline comes from the slide's tissue mask sampled at the fine grid.

The fine grid divides each feature cell into `factor` x `factor` pixels, with `factor` the smallest multiple of
the network pixel that brings the fine pixel to at most `MAX_FINE_UM` µm; it is read straight from the slide.
"""

from __future__ import annotations

import math

import numpy as np

from equiseg_wsi import refine_kernel
from equiseg_wsi.context import tissue_pixels
from equiseg_wsi.slide import Slide
from equiseg_wsi.tissue import TissueMap

__all__ = ["MAX_FINE_PIXELS", "MAX_FINE_UM", "fine_factor", "colour_refine", "refine_region"]

MAX_FINE_UM = 2.0  # µm: about the resolution a QuPath user looks at when judging a segment border
MAX_FINE_PIXELS = 32_000_000  # a larger region is refined on a coarser fine grid (memory: ~4 bytes per pixel)
BLOCK_CELLS = 64
MARGIN_CELLS = 2
_SUPPORT = 0.05  # share of the pixels within one cell a cluster needs before a pixel there may join it


def fine_factor(stride: int, target_mpp: float, n_cells: int) -> int:
    """Fine pixels per feature cell side: the cell's `stride` network pixels, each split into m fine pixels, the
    smallest m with fine pixels of at most `MAX_FINE_UM` µm; halved (down to one per cell) while the region's
    fine grid would exceed `MAX_FINE_PIXELS`."""
    factor = int(stride * max(1, math.ceil(target_mpp / MAX_FINE_UM - 1e-9)))
    while factor > 1 and n_cells * factor * factor > MAX_FINE_PIXELS:
        factor //= 2
    return factor


def _box_sum(a: np.ndarray, radius: int) -> np.ndarray:
    """Sum over the (2r+1)² window around each pixel (edges mirrored), in exact integer arithmetic, so the result
    does not depend on the order of the axes (a rotated input gives the rotated sums, bit for bit).

    The running sums are int32 and may wrap around; the window sums, differences of them, are still exact
    (arithmetic modulo 2**32) while a window's true sum fits in int32: (2r+1)² x 4080 does for r < 360."""
    if a.ndim == 3:  # channel by channel: running sums over contiguous planes are several times faster
        return np.stack([_box_sum(a[..., i], radius) for i in range(a.shape[2])], axis=-1)
    padded = np.pad(a if a.dtype == np.int32 else a.astype(np.int32), [(radius + 1, radius)] * 2, mode="symmetric")
    padded[0] = 0
    padded[:, 0] = 0
    c = np.cumsum(np.cumsum(padded, axis=0, out=padded), axis=1, out=padded)  # in place: the same sums
    n = 2 * radius + 1
    with np.errstate(over="ignore"):
        out: np.ndarray = c[n:, n:] - c[:-n, n:]
        out -= c[n:, :-n]
        out += c[:-n, :-n]
    return out


def _smoothed(rgb: np.ndarray) -> np.ndarray:
    """16 x the colour smoothed by the 3 x 3 binomial kernel (edges mirrored), as exact integers."""
    p = np.pad(rgb.astype(np.int32), [(1, 1), (1, 1), (0, 0)], mode="symmetric")
    rows = p[:-2] + 2 * p[1:-1] + p[2:]
    return np.asarray(rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:])


def colour_refine(labels: np.ndarray, rgb: np.ndarray, factor: int, tissue: np.ndarray, k: int) -> np.ndarray:
    """Labels (h, w) at cell resolution -> labels (h*factor, w*factor) whose borders follow the image.

    Near a border (where more than one cluster holds at least `_SUPPORT` of the pixels within one cell), a
    pixel takes the cluster whose local mean colour (over those pixels) is nearest to its own, slightly smoothed,
    colour; elsewhere the cell's label stands. `tissue` is the fine tissue mask: pixels outside it become 0,
    tissue pixels of unlabelled cells next to labelled ones are labelled the same way. Sums are exact integers,
    so the result rotates exactly with its inputs. Computed in one compiled pass (`refine_kernel`) when numba is
    there, else in NumPy (`numpy_refine`): the same labels.
    """
    radius = factor
    need = _SUPPORT * (2 * radius + 1) ** 2
    fine = np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)
    if refine_kernel.available():
        out = refine_kernel.refine_labels(fine, _smoothed(rgb), radius, need, k).astype(np.int32, copy=False)
    else:  # pragma: no cover - numba is a dependency
        out = numpy_refine(fine, _smoothed(rgb), radius, need, k)
    out[~tissue] = 0
    return out


def numpy_refine(fine: np.ndarray, smoothed: np.ndarray, radius: int, need: float, k: int) -> np.ndarray:
    """`colour_refine` before the tissue mask, in NumPy: the reference for the compiled pass."""
    img = np.ascontiguousarray(smoothed.transpose(2, 0, 1))  # channel planes: faster running sums
    best = np.full(fine.shape, np.inf)
    choice = np.zeros(fine.shape, dtype=np.int32)
    n_supported = np.zeros(fine.shape, dtype=np.int32)
    for cluster in range(1, k + 1):
        p = fine == cluster
        if not p.any():
            continue
        count = _box_sum(p, radius)
        supported = count >= need
        n = np.maximum(count, 1)
        dist = np.zeros(fine.shape)
        for plane in img:  # squared colour distance to the local mean, summed over the channels in order
            diff = np.divide(_box_sum(plane * p, radius), n, dtype=np.float64)
            np.subtract(diff, plane, out=diff)  # (mean - colour)² is (colour - mean)², bit for bit
            dist += np.square(diff, out=diff)
        d = np.where(supported, dist, np.inf)
        take = d < best  # strictly smaller: ties keep the lower cluster id
        np.copyto(choice, cluster, where=take)
        np.copyto(best, d, where=take)
        n_supported += supported
    border = (n_supported > 1) | ((fine == 0) & (n_supported > 0))
    out: np.ndarray = np.where(border, choice, fine).astype(np.int32)
    return out


def _read_fine(slide: Slide, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
    """The slide at `mpp`; where that is finer than the slide by a whole factor, its pixels are repeated (exact,
    and rotating with the slide) rather than interpolated."""
    ratio = slide.mpp / mpp
    up = round(ratio)
    if up >= 2 and abs(ratio - up) < 1e-6 and width % up == 0 and height % up == 0:
        coarse = slide.read_region(x, y, width // up, height // up, slide.mpp)
        return np.repeat(np.repeat(coarse, up, axis=0), up, axis=1)
    return slide.read_region(x, y, width, height, mpp)


def refine_region(
    slide: Slide, labels: np.ndarray, tissue_map: TissueMap, x0: float, y0: float, cell_level0: float, factor: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The refined labels and the fine image (uint8 RGB) of a region whose cell grid starts at level-0 (x0, y0).

    Works in blocks of `BLOCK_CELLS` cells read from the slide with a margin of `MARGIN_CELLS` cells, wider than the
    filter's reach (one cell), so the result equals one pass over the whole region while memory stays that of a
    block plus the two fine output arrays.
    """
    h, w = labels.shape
    fine_level0 = cell_level0 / factor
    mpp = fine_level0 * slide.mpp
    out = np.zeros((h * factor, w * factor), dtype=np.uint8)
    rgb = np.empty((h * factor, w * factor, 3), dtype=np.uint8)
    for r0 in range(0, h, BLOCK_CELLS):
        for c0 in range(0, w, BLOCK_CELLS):
            r1, c1 = min(r0 + BLOCK_CELLS, h), min(c0 + BLOCK_CELLS, w)
            if not labels[r0:r1, c0:c1].any():
                rgb[r0 * factor : r1 * factor, c0 * factor : c1 * factor] = _read_fine(
                    slide,
                    x0 + c0 * cell_level0, y0 + r0 * cell_level0, (c1 - c0) * factor, (r1 - r0) * factor, mpp)
                continue
            a0, b0 = max(0, r0 - MARGIN_CELLS), max(0, c0 - MARGIN_CELLS)
            a1, b1 = min(h, r1 + MARGIN_CELLS), min(w, c1 + MARGIN_CELLS)
            bx, by = x0 + b0 * cell_level0, y0 + a0 * cell_level0
            shape = ((a1 - a0) * factor, (b1 - b0) * factor)
            block_rgb = _read_fine(slide, bx, by, shape[1], shape[0], mpp)
            tissue = tissue_pixels(tissue_map, bx, by, fine_level0, shape)
            refined = colour_refine(labels[a0:a1, b0:b1], block_rgb, factor, tissue, k)
            inner = (slice((r0 - a0) * factor, (r1 - a0) * factor), slice((c0 - b0) * factor, (c1 - b0) * factor))
            out[r0 * factor : r1 * factor, c0 * factor : c1 * factor] = refined[inner]
            rgb[r0 * factor : r1 * factor, c0 * factor : c1 * factor] = block_rgb[inner]
    return out.astype(np.int32), rgb
