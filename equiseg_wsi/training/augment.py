"""What makes two views of one tissue spot differ: stain and colour jitter, blur, a synthetic tissue border,
optional 90° turns and flips, and the random crop of class tiles.

Every function draws from the generator it is given, a fixed number of times per view, so an epoch's
augmentations follow from its seed alone (what makes a resumed run reproduce an uninterrupted one).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from equiseg_wsi.training.config import PretrainConfig

__all__ = ["augment", "colour_jitter", "hed_to_rgb", "random_resized", "rgb_to_hed", "tissue_border"]

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density, as in
# scikit-image's rgb_from_hed; each row is normalised to unit length.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)

BORDER_FRACTION = (0.1, 0.5)  # share of a view that a synthetic border turns into glass
GLASS_GREY = (225.0, 255.0)  # grey level of empty slide glass in 8-bit RGB scans (drawn per view)
GLASS_NOISE = 3.0  # per-pixel standard deviation of that grey level


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Colour deconvolution (Ruifrok-Johnston): RGB uint8/float 0-255 -> stain amounts (H, E, DAB) in OD units."""
    od = -np.log10(np.clip(np.asarray(rgb, dtype=np.float64), 1.0, 255.0) / 255.0)
    hed: np.ndarray = od @ _HED_FROM_RGB
    return hed


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hed`: stain amounts -> RGB float in 0-255 (clipped)."""
    od = np.asarray(hed, dtype=np.float64) @ _RGB_FROM_HED
    return np.clip(255.0 * np.power(10.0, -od), 0.0, 255.0)


def colour_jitter(rgb: np.ndarray, cfg: PretrainConfig, rng: np.random.Generator) -> np.ndarray:
    """HED stain jitter (Tellez et al. 2018: each stain scaled by 1±σ and shifted by ±σ), then mild
    brightness/contrast: stain variation between labs is the nuisance the features should ignore."""
    out = rgb.astype(np.float64)
    if cfg.hed_sigma > 0:
        hed = rgb_to_hed(out)
        a = 1.0 + rng.uniform(-cfg.hed_sigma, cfg.hed_sigma, size=3)
        b = rng.uniform(-cfg.hed_sigma, cfg.hed_sigma, size=3)
        out = hed_to_rgb(hed * a + b)
    if cfg.contrast > 0 or cfg.brightness > 0:
        c = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
        br = 255.0 * rng.uniform(-cfg.brightness, cfg.brightness)
        mean = out.mean()
        out = (out - mean) * c + mean + br
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def tissue_border(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace the part of the view beyond a random straight line (10-50 % of its area) with empty glass.

    A segmentation cell near a tissue edge, a tear or a core's rim sees glass in its receptive field; without
    this, a model trained on views from inside the tissue learns "near glass" as a feature of its own, and
    K-means spends a cluster on a rim around every piece of tissue. With a border in one view of a pair and
    none (or another) in the other, the pooled features must describe the tissue whatever glass is beside it.
    """
    h, w = rgb.shape[:2]
    theta = rng.uniform(0.0, 2.0 * np.pi)
    fraction = rng.uniform(*BORDER_FRACTION)
    grey = rng.uniform(*GLASS_GREY)
    yy, xx = np.mgrid[0:h, 0:w]
    along = (xx - (w - 1) / 2) * np.cos(theta) + (yy - (h - 1) / 2) * np.sin(theta)
    glass = along > np.quantile(along, 1.0 - fraction)
    out: np.ndarray = rgb.copy()
    noise = rng.normal(grey, GLASS_NOISE, size=(int(glass.sum()), 1))
    out[glass] = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
    return out


def augment(rgb: np.ndarray, cfg: PretrainConfig, rng: np.random.Generator) -> np.ndarray:
    """Optional tissue border, colour jitter, optional blur, optional rot90/flip (why: :mod:`equiseg_wsi.pretrain`)."""
    if cfg.border_prob > 0 and rng.random() < cfg.border_prob:
        rgb = tissue_border(rgb, rng)
    out = colour_jitter(rgb, cfg, rng)
    if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
        radius = float(rng.uniform(0.1, cfg.blur_max_px))
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius)))
    else:
        rng.random()  # keep the number of draws per view fixed
    if cfg.rotate_augment:
        out = np.rot90(out, int(rng.integers(4)))
        if rng.random() < 0.5:
            out = out[:, ::-1]
    return np.ascontiguousarray(out)


def random_resized(rgb: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crop of 60-100 % of the side, resized back: scale jitter for class tiles."""
    side = rgb.shape[0]
    c = int(round(side * rng.uniform(0.6, 1.0)))
    y, x = rng.integers(0, side - c + 1, size=2)
    crop = Image.fromarray(rgb[y : y + c, x : x + c])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
