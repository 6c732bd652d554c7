"""Tissue detection at low resolution, robust from 0% to 100% tissue cover.

The original method thresholded with Otsu and inverted the mask when it covered more than half the image,
which fails whenever tissue covers less than 50% (and Otsu alone splits even a blank or a fully covered image
in two). Here a pixel is tissue when it is both stained (optical density of its darkest channel above an
absolute floor) and coloured (HSV saturation above a floor): glass, grey shadows and blank images never pass,
and a fully covered image passes almost everywhere. Only when the optical-density histogram is clearly bimodal
*and* its light class looks like glass does Otsu raise the floor (to adapt to tinted or hazy backgrounds), and
never above a cap that every H&E stain exceeds.

Defaults (all areas in µm² at the slide's physical scale, so they mean the same thing at any mask mpp):

- `DEFAULT_TISSUE_MPP` = 8 µm/px: mask resolution (a 2 mm core is 250 px across).
- `DEFAULT_MIN_AREA_UM2` = 5,000 µm² (a blob about 80 µm across): smaller components are debris.
- `DEFAULT_MAX_HOLE_UM2` = 4,000 µm² (about 70 µm across): smaller holes are always filled; larger holes are
  lumina, filled too unless `keep_lumina=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from equiseg_wsi.slide import Slide

__all__ = [
    "DEFAULT_MAX_HOLE_UM2",
    "DEFAULT_MIN_AREA_UM2",
    "DEFAULT_TISSUE_MPP",
    "TissueMap",
    "TissueRegion",
    "detect_tissue",
    "tissue_mask",
]

DEFAULT_TISSUE_MPP = 8.0
DEFAULT_MIN_AREA_UM2 = 5_000.0
DEFAULT_MAX_HOLE_UM2 = 4_000.0

# Optical density (log10) of the darkest channel: glass is ~0.02, the palest H&E stroma ~0.1, nuclei > 0.5.
OD_FLOOR = 0.07
# Otsu may raise the threshold to adapt to a tinted background, but never above this.
OD_CAP = 0.15
# The light Otsu class counts as glass only if its mean OD is below this.
GLASS_OD_MAX = 0.08
# Otsu's effectiveness (between-class / total variance) above which the histogram counts as bimodal.
BIMODAL_ETA = 0.7
# HSV saturation floor: H&E is coloured; glass, dust and shadows are grey.
SAT_FLOOR = 0.06

_CROSS = ndimage.generate_binary_structure(2, 1)


def _od_and_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB array (h, w, 3), got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.float32)
    hi = rgb.max(axis=2)
    lo = rgb.min(axis=2)
    od = -np.log10(np.clip(lo, 1.0, 255.0) / 255.0)
    sat = (hi - lo) / np.maximum(hi, 1.0)
    return od, sat


def _otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float, float]:
    """(threshold, effectiveness eta, mean of the lower class) of Otsu's method on `values`."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    w0 = np.cumsum(p)
    m = np.cumsum(p * centres)
    mt = m[-1]
    var_t = float((p * (centres - mt) ** 2).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        var_b = (mt * w0 - m) ** 2 / (w0 * (1 - w0))
    var_b = np.nan_to_num(var_b[:-1], nan=0.0, posinf=0.0)
    if var_t <= 0 or not var_b.size:
        return float(edges[-1]), 0.0, float(mt)
    k = int(np.argmax(var_b))
    low_mean = float(m[k] / w0[k]) if w0[k] > 0 else float(mt)
    return float(edges[k + 1]), float(var_b[k] / var_t), low_mean


def _threshold(od: np.ndarray) -> float:
    """The OD threshold: the absolute floor, raised by Otsu only for a bimodal glass-vs-tissue histogram."""
    values = od[np.isfinite(od)].ravel()
    if values.size < 16 or float(values.max() - values.min()) < 1e-3:
        return OD_FLOOR
    t, eta, low_mean = _otsu(np.minimum(values, 2.0))
    if eta >= BIMODAL_ETA and low_mean <= GLASS_OD_MAX:
        return float(min(max(t, OD_FLOOR), OD_CAP))
    return OD_FLOOR


def _clean(mask: np.ndarray, min_px: float, max_hole_px: float, keep_lumina: bool) -> np.ndarray:
    """Drop components smaller than `min_px`; fill holes below `max_hole_px` (all holes unless keep_lumina)."""
    labels, n = ndimage.label(mask, structure=_CROSS)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[labels]
    filled = ndimage.binary_fill_holes(mask, structure=_CROSS)
    holes = filled & ~mask
    if not holes.any():
        return mask
    if not keep_lumina:
        return filled
    # Holes are 8-connected background regions inside 4-connected tissue.
    hole_labels, nh = ndimage.label(holes, structure=np.ones((3, 3), bool))
    sizes = np.bincount(hole_labels.ravel(), minlength=nh + 1)
    small = sizes < max_hole_px
    small[0] = False
    return mask | small[hole_labels]


def _is_colour(rgb: np.ndarray) -> bool:
    """False for grey-scale images stored as RGB (all channels equal within JPEG noise)."""
    sample = np.asarray(rgb[::4, ::4], dtype=np.int16)
    spread = sample.max(axis=-1) - sample.min(axis=-1)
    return bool(np.percentile(spread, 99) > 8)


def tissue_mask(
    rgb: np.ndarray,
    mpp: float,
    *,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    max_hole_um2: float = DEFAULT_MAX_HOLE_UM2,
    keep_lumina: bool = False,
) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image at `mpp` µm/px (best at 4–16 µm/px).

    `min_area_um2`: components below this area are removed as debris. `max_hole_um2`: holes below this are
    filled; larger holes (lumina) are filled as well unless `keep_lumina`.
    """
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    od, sat = _od_and_saturation(rgb)
    raw = od >= _threshold(od)
    if _is_colour(rgb):  # a grey-scale image has no saturation to tell stain from grey haze: density alone
        raw &= sat >= SAT_FLOOR
    px_area = float(mpp) ** 2
    return _clean(raw, min_area_um2 / px_area, max_hole_um2 / px_area, keep_lumina)


@dataclass
class TissueRegion:
    """One connected piece of tissue; `bbox_level0` is (x, y, w, h) in level-0 px, `mask_crop` at mask mpp."""

    name: str
    bbox_level0: tuple[float, float, float, float]
    area_um2: float
    mask_crop: np.ndarray
    bbox_mask: tuple[int, int, int, int] = (0, 0, 0, 0)  # (col, row, width, height) in mask px


@dataclass
class TissueMap:
    """A slide's tissue mask at `mpp` µm/px; one mask pixel spans `px_level0` level-0 px on each side."""

    mask: np.ndarray
    mpp: float
    px_level0: float
    tissue_fraction: float
    regions: list[TissueRegion] = field(default_factory=list)

    def polygons_level0(self) -> BaseGeometry:
        """Tissue as a shapely MultiPolygon in level-0 px, traced along mask pixel edges (holes kept)."""
        from shapely.geometry import MultiPolygon

        from equiseg_wsi.polygons import GridPlacement, label_map_to_polygons

        traced = label_map_to_polygons(self.mask.astype(np.int32), GridPlacement(0.0, 0.0, self.px_level0), 0,
                                       snap=False)
        return traced.get(1, MultiPolygon())


def _regions(mask: np.ndarray, mpp: float, px_level0: float) -> list[TissueRegion]:
    """Connected regions, named region-001... in reading order (top row of bbox, then left column)."""
    labels, n = ndimage.label(mask, structure=_CROSS)
    if not n:
        return []
    slices = ndimage.find_objects(labels)
    order = sorted(range(n), key=lambda i: (slices[i][0].start, slices[i][1].start, i))
    out = []
    for rank, i in enumerate(order, start=1):
        sy, sx = slices[i]
        crop = labels[sy, sx] == i + 1
        out.append(
            TissueRegion(
                name=f"region-{rank:03d}",
                bbox_level0=(
                    sx.start * px_level0,
                    sy.start * px_level0,
                    (sx.stop - sx.start) * px_level0,
                    (sy.stop - sy.start) * px_level0,
                ),
                area_um2=float(crop.sum()) * mpp * mpp,
                mask_crop=crop,
                bbox_mask=(sx.start, sy.start, sx.stop - sx.start, sy.stop - sy.start),
            )
        )
    return out


def detect_tissue(
    slide: Slide,
    mpp: float = DEFAULT_TISSUE_MPP,
    *,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    max_hole_um2: float = DEFAULT_MAX_HOLE_UM2,
    keep_lumina: bool = False,
) -> TissueMap:
    """Read the whole slide at `mpp` µm/px (never finer than level 0) and find its tissue.

    The mask's pixel (r, c) covers level-0 [c*s, (c+1)*s) x [r*s, (r+1)*s), s = `px_level0`; raises
    MppUnknownError when the slide's resolution is unknown.
    """
    mpp = max(float(mpp), slide.mpp)
    rgb = slide.read_full(mpp)
    mask = tissue_mask(rgb, mpp, min_area_um2=min_area_um2, max_hole_um2=max_hole_um2, keep_lumina=keep_lumina)
    px_level0 = mpp / slide.mpp
    fraction = float(mask.mean()) if mask.size else 0.0
    return TissueMap(mask=mask, mpp=mpp, px_level0=px_level0, tissue_fraction=fraction,
                     regions=_regions(mask, mpp, px_level0))
