"""Train the SRE-ResNet (or its standard twin): self-supervised on slide tiles, or supervised on class folders.

Two modes, one loop:

* ``ssl``: SimCLR (NT-Xent on globally pooled ``layer4`` features through a 2-layer projection head). Two
  views of the same tissue spot differ by position (up to a quarter tile), scale (each view drawn at its own
  µm/px between ``mpp_min`` and ``mpp_max``), stain (Ruifrok-Johnston HED jitter), brightness/contrast and
  Gaussian blur. Chosen over BYOL/DINO because it needs no teacher network (half the compute per step) and
  trains usefully in a few hundred small-batch steps on a CPU.
  **Dense term** (opt-in, ``dense_weight`` > 0; DenseCL/PixPro style): segmentation clusters ``layer4`` cells, not
  pooled vectors, so the pooled loss alone leaves the per-cell features free to follow grid alignment and fine
  detail (fragmented segments). Each view's box on the slide is known, so every cell of view A has an exact
  partner location in view B (other shift, other µm/px); B's projected cell map is resampled there bilinearly
  and an InfoNCE makes the pair agree, against the cells of the other spots in the batch (cells of the same
  spot are neither pulled nor pushed). The pooled NT-Xent stays, so the features cannot collapse.
  ``dense_loss="cosine"`` instead pulls the matched cells of the raw ``layer4`` maps (the features that are
  clustered) together by cosine, with no negatives and no extra head (PixPro's consistency without its
  momentum teacher; the pooled NT-Xent is what prevents collapse): other spots often show the same tissue
  type, and negatives would push those cells apart. Off by default: on the validation rows of the one
  training image neither variant beat the pooled loss alone (docs/model_card.md), so it is kept for cohorts
  where it can be validated, not adopted.
  **Tissue borders** (opt-in, ``border_prob`` > 0): a view gets, with that probability, a straight edge beyond
  which it shows empty glass (10-50 % of the view; :func:`_tissue_border`). Views are centred on tissue, so
  without it the network rarely sees glass beside tissue, while every segmentation cell near an edge does, and
  K-means spent a cluster on a rim around the tissue. The shipped model uses 0.5 (docs/model_card.md).
  **No rotation augmentation** by default: an SRE network is rotation-equivariant by construction (exactly
  for 90° turns and flips, closely at other angles) and its pooled features are therefore already invariant;
  a rotated view carries no new information and would only cost compute. ``rotate_augment=True`` adds
  random 90° turns and flips, e.g. to give the standard twin invariance learnt from data; the shipped
  twin is trained without it so that the SRE-vs-standard comparison isolates the architecture.
* ``supervised``: cross-entropy on ``ROOT/<class>/*.png|jpg|tif`` (the NCT-CRC-HE-100K layout), with a
  seeded stratified validation split; accuracy is reported at 0/90/180/270° of the validation tiles.

Resume: a checkpoint after every epoch holds model, head, optimizer, scheduler, AMP scaler, RNG states and
the log; all randomness of an epoch (data order, views, augmentations) is drawn from generators seeded by
``(seed, epoch)``, so a resumed run continues with exactly the losses of an uninterrupted one (same
machine, same thread count).

The library never prints: progress goes to ``on_step``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor, nn

from equiseg_wsi.errors import InputError, NoTissueError
from equiseg_wsi.models.resnet import ArchSpec, ResNetFeatures, build_model
from equiseg_wsi.models.sre_conv import set_forward_path
from equiseg_wsi.models.weights import DEFAULT_NORMALIZATION, save_weights

__all__ = [
    "CLASS_SUFFIXES",
    "PretrainConfig",
    "PretrainResult",
    "StepInfo",
    "TrainingNet",
    "cell_grid",
    "dense_cosine",
    "dense_nt_xent",
    "hed_to_rgb",
    "nt_xent",
    "predict_tiles",
    "pretrain",
    "rgb_to_hed",
    "scan_class_folder",
]

MODES = ("ssl", "supervised")
DENSE_LOSSES = ("infonce", "cosine")
CLASS_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
LOG_NAME = "log.csv"
EPOCHS_NAME = "epochs.csv"
PLOT_NAME = "loss.png"

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density, as in
# scikit-image's rgb_from_hed; each row is normalised to unit length.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Colour deconvolution (Ruifrok-Johnston): RGB uint8/float 0-255 -> stain amounts (H, E, DAB) in OD units."""
    od = -np.log10(np.clip(np.asarray(rgb, dtype=np.float64), 1.0, 255.0) / 255.0)
    return od @ _HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hed`: stain amounts -> RGB float in 0-255 (clipped)."""
    od = np.asarray(hed, dtype=np.float64) @ _RGB_FROM_HED
    return np.clip(255.0 * np.power(10.0, -od), 0.0, 255.0)


@dataclass(frozen=True)
class PretrainConfig:
    """Every option that changes the result (stored in the weights file); units in the names or docs.

    tile: network input side in px (a multiple of 8 keeps rot90 equivariance exact through the poolings).
    mpp_min/mpp_max: ssl views are read at a log-uniform µm/px in this range (the product runs at 2.5).
    steps_per_epoch: ssl only (an epoch of supervised training is one pass over the training tiles).
    region: ssl only, level-0 rectangle (x, y, w, h) of every input from which views may be read (the whole
        view, not only its centre, stays inside), e.g. to hold out part of an image for evaluation.
    forward_path: SRE forward path during training ("dense" measured fastest for training on CPU and is
        what cuDNN runs on GPU); inference keeps choosing its own fastest exact path.
    dense_weight: ssl only, weight of the dense (per-cell) term added to the pooled NT-Xent. 0 (default) =
        pooled SimCLR only, the shipped model's recipe: no dense head is built and every loss is unchanged.
        Off by default because neither dense variant beat it on the validation rows (docs/model_card.md).
    dense_loss: "infonce" (projected cells, other spots' cells as negatives) or "cosine" (raw layer4 cells,
        matched cells pulled together, no negatives); see the module docstring.
    border_prob: probability that a view gets a synthetic tissue border (see :func:`_tissue_border`); 0 draws
        nothing, so older recipes reproduce exactly.
    """

    mode: str = "ssl"
    arch: str = "sre"
    widths: tuple[int, ...] = (64, 128, 256, 512)
    tile: int = 64
    mpp_min: float = 1.0
    mpp_max: float = 2.5
    batch_size: int = 16
    epochs: int = 4
    steps_per_epoch: int = 25
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    temperature: float = 0.2
    proj_dim: int = 128
    dense_weight: float = 0.0
    dense_loss: str = "infonce"
    val_fraction: float = 0.2
    rotate_augment: bool = False
    hed_sigma: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    blur_prob: float = 0.5
    blur_max_px: float = 1.0
    border_prob: float = 0.0
    tissue_mpp: float = 8.0
    region: tuple[float, float, float, float] | None = None
    seed: int = 0
    forward_path: str = "dense"
    save_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.arch not in ("sre", "standard"):
            raise InputError(f"arch must be 'sre' or 'standard', got {self.arch!r}")
        if self.tile < 16 or self.tile % 8:
            raise InputError(f"tile must be a multiple of 8 and >= 16 px, got {self.tile}")
        if not 0 < self.mpp_min <= self.mpp_max:
            raise InputError(f"need 0 < mpp_min <= mpp_max, got {self.mpp_min}, {self.mpp_max}")
        if self.batch_size < 2:
            raise InputError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise InputError("epochs and steps_per_epoch must be >= 1")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.save_dtype not in ("float32", "float16"):
            raise InputError(f"save_dtype must be float32 or float16, got {self.save_dtype!r}")
        if not (self.dense_weight >= 0 and math.isfinite(self.dense_weight)):
            raise InputError(f"dense_weight must be a finite number >= 0, got {self.dense_weight}")
        if not 0 <= self.border_prob <= 1:
            raise InputError(f"border_prob must be in [0, 1], got {self.border_prob}")
        if self.dense_loss not in DENSE_LOSSES:
            raise InputError(f"dense_loss must be one of {DENSE_LOSSES}, got {self.dense_loss!r}")
        if self.region is not None and (len(self.region) != 4 or self.region[2] <= 0 or self.region[3] <= 0):
            raise InputError(f"region must be x, y, w, h with positive w and h, got {self.region}")

    def arch_spec(self, num_classes: int = 0) -> ArchSpec:
        return ArchSpec(kind=self.arch, widths=tuple(self.widths), num_classes=num_classes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        d["region"] = list(self.region) if self.region is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        kw = dict(d)
        kw.setdefault("dense_weight", 0.0)  # files written before the dense term trained without it
        kw.setdefault("dense_loss", "infonce")
        kw.setdefault("border_prob", 0.0)  # files written before the border augmentation trained without it
        kw["widths"] = tuple(kw["widths"])
        kw["region"] = tuple(kw["region"]) if kw.get("region") is not None else None
        return cls(**kw)


@dataclass
class StepInfo:
    """One finished training step, for progress bars."""

    epoch: int  # 1-based
    epochs: int
    step: int  # global, 1-based
    total_steps: int
    loss: float
    lr: float


@dataclass
class PretrainResult:
    """Where the outputs are and what the run measured."""

    weights: Path
    checkpoint: Path
    log_csv: Path
    epochs_csv: Path
    plot: Path | None
    metrics: dict[str, float]
    seconds: float
    epochs_done: int
    finished: bool
    data: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ augmentation


def _colour_jitter(rgb: np.ndarray, cfg: PretrainConfig, rng: np.random.Generator) -> np.ndarray:
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


BORDER_FRACTION = (0.1, 0.5)  # share of a view that a synthetic border turns into glass
GLASS_GREY = (225.0, 255.0)  # grey level of empty slide glass in 8-bit RGB scans (drawn per view)
GLASS_NOISE = 3.0  # per-pixel standard deviation of that grey level


def _tissue_border(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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
    out = rgb.copy()
    noise = rng.normal(grey, GLASS_NOISE, size=(int(glass.sum()), 1))
    out[glass] = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
    return out


def _augment(rgb: np.ndarray, cfg: PretrainConfig, rng: np.random.Generator) -> np.ndarray:
    """Optional tissue border, colour jitter, optional blur, optional rot90/flip (see the module docstring)."""
    if cfg.border_prob > 0 and rng.random() < cfg.border_prob:
        rgb = _tissue_border(rgb, rng)
    out = _colour_jitter(rgb, cfg, rng)
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


# ---------------------------------------------------------------------------------------------- data


@dataclass
class _SlideSpots:
    slide: Any  # equiseg_wsi.slide.Slide
    name: str
    centres: np.ndarray  # (n, 2) level-0 x, y of candidate view centres
    cell: float  # level-0 px per tissue-mask pixel
    tissue_um2: float


class SlideViews:
    """Pairs of augmented views of random tissue spots of a set of slides (the ssl data).

    Spots are tissue-mask pixels whose whole view box (largest scale plus the largest shift) lies inside
    ``region``, so no pixel outside it is ever read. Inputs are weighted by their usable tissue area.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], cfg: PretrainConfig, *, backend: str = "auto",
                 mpp: float | None = None) -> None:
        from equiseg_wsi.slide import open_slide
        from equiseg_wsi.tissue import detect_tissue

        self.cfg = cfg
        self.spots: list[_SlideSpots] = []
        for p in paths:
            slide = open_slide(p, backend=backend, mpp=mpp)
            tissue = detect_tissue(slide, cfg.tissue_mpp)
            half = 0.5 * cfg.tile * cfg.mpp_max / slide.mpp * 1.5  # half view + max shift (quarter tile)
            x0, y0, w, h = cfg.region if cfg.region is not None else (0.0, 0.0, slide.width, slide.height)
            x1, y1 = min(x0 + w, slide.width), min(y0 + h, slide.height)
            x0, y0 = max(x0, 0.0), max(y0, 0.0)
            rows, cols = np.nonzero(tissue.mask)
            s = tissue.px_level0
            cx, cy = (cols + 0.5) * s, (rows + 0.5) * s
            keep = (cx - half >= x0) & (cx + half <= x1) & (cy - half >= y0) & (cy + half <= y1)
            centres = np.stack([cx[keep], cy[keep]], axis=1)
            if len(centres):
                area = float(keep.sum()) * tissue.mpp * tissue.mpp
                self.spots.append(_SlideSpots(slide, Path(p).name, centres, s, area))
            else:
                slide.close()
        if not self.spots:
            raise NoTissueError("no tissue spot far enough inside the training region of any input "
                                f"(views need {cfg.tile} px at up to {cfg.mpp_max} µm/px)")
        areas = np.array([s.tissue_um2 for s in self.spots])
        self.weights = areas / areas.sum()

    def summary(self) -> dict[str, Any]:
        return {
            "inputs": [{"name": s.name, "usable_tissue_mm2": round(s.tissue_um2 / 1e6, 4),
                        "width_px": s.slide.width, "height_px": s.slide.height, "mpp": s.slide.mpp}
                       for s in self.spots],
            "region_level0": list(self.cfg.region) if self.cfg.region is not None else None,
        }

    def _view(self, src: _SlideSpots, cx: float, cy: float,
              rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float]]:
        cfg = self.cfg
        mpp = float(np.exp(rng.uniform(np.log(cfg.mpp_min), np.log(cfg.mpp_max))))
        span = cfg.tile * mpp / src.slide.mpp  # level-0 px covered by the view
        dx, dy = rng.uniform(-0.25, 0.25, size=2) * span
        x, y = cx + dx - span / 2, cy + dy - span / 2
        rgb = src.slide.read_region(x, y, cfg.tile, cfg.tile, mpp)
        return _augment(rgb, cfg, rng), (float(x), float(y), float(span))

    def batch(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """View A and view B of the same n spots, two (n, tile, tile, 3) uint8 arrays, and their boxes on the
        slide, (2, n, 3) level-0 x, y (top left) and side: what the dense term needs to match cells."""
        a, b, boxes_a, boxes_b = [], [], [], []
        for _ in range(n):
            src = self.spots[int(rng.choice(len(self.spots), p=self.weights))]
            cx, cy = src.centres[int(rng.integers(len(src.centres)))]
            cx += rng.uniform(-0.5, 0.5) * src.cell
            cy += rng.uniform(-0.5, 0.5) * src.cell
            for views, boxes in ((a, boxes_a), (b, boxes_b)):
                rgb, box = self._view(src, cx, cy, rng)
                views.append(rgb)
                boxes.append(box)
        return np.stack(a), np.stack(b), np.array([boxes_a, boxes_b], dtype=np.float64)

    def close(self) -> None:
        for s in self.spots:
            s.slide.close()


def scan_class_folder(root: str | os.PathLike[str]) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names) and (file, class index) pairs of ``ROOT/<class>/*``."""
    base = Path(root)
    if not base.is_dir():
        raise InputError(f"{base}: not a folder (supervised mode needs ROOT/<class>/*.png|jpg|tif)")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    items: list[tuple[Path, int]] = []
    for i, c in enumerate(classes):
        items += [(f, i) for f in sorted((base / c).iterdir())
                  if f.is_file() and f.suffix.lower() in CLASS_SUFFIXES]
    counts = {c: sum(1 for _, k in items if k == i) for i, c in enumerate(classes)}
    if len(classes) < 2 or any(v < 2 for v in counts.values()):
        raise InputError(f"{base}: need >= 2 class folders with >= 2 images each, found {counts or 'none'}")
    return classes, items


def _split(items: list[tuple[Path, int]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split: at least one validation and one training tile per class."""
    rng = np.random.default_rng([seed, 7919])
    train, val = [], []
    labels = np.array([k for _, k in items])
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def _load_tile(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BOX if rgb.width > size else Image.Resampling.BICUBIC)
            return np.asarray(rgb)
    except OSError as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None


def _random_resized(rgb: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crop of 60-100 % of the side, resized back: scale jitter for class tiles."""
    side = rgb.shape[0]
    c = int(round(side * rng.uniform(0.6, 1.0)))
    y, x = rng.integers(0, side - c + 1, size=2)
    crop = Image.fromarray(rgb[y : y + c, x : x + c])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))


# --------------------------------------------------------------------------------------------- model


class TrainingNet(nn.Module):
    """Backbone plus the training-only heads (projection MLP for ssl, and with ``dense`` the same MLP as
    1x1 convolutions on every ``layer4`` cell, for the InfoNCE dense term; the backbone's fc for supervised)."""

    def __init__(self, backbone: ResNetFeatures, proj_dim: int, ssl: bool, dense: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        c = backbone.spec.widths[-1]
        self.head: nn.Module | None = None
        self.dense_head: nn.Module | None = None
        if ssl:
            self.head = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, proj_dim))
            if dense:
                self.dense_head = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, proj_dim, 1))

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Pooled projection (n, proj_dim) and the cell map: projected (n, proj_dim, h, w) with the dense head,
        else the raw ``layer4`` map (ssl; None for supervised)."""
        if self.head is None:
            return self.backbone(x), None
        fmap = self.backbone.features(x, ("layer4",))["layer4"]
        cells = self.dense_head(fmap) if self.dense_head is not None else fmap
        return self.head(fmap.mean(dim=(2, 3))), cells

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)[0]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's normalised-temperature cross entropy: each view must pick its partner among 2n - 1."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def cell_grid(src: np.ndarray, dst: np.ndarray, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Where each cell centre of view ``src`` lies in view ``dst``, as a ``grid_sample`` grid.

    src, dst: (n, 3) level-0 boxes (x, y, side) of square views; size: the (h, w) cell map of both views.
    Returns the grid (n, h, w, 2) in dst's normalised coordinates (align_corners=False: -1 and 1 are the
    outer edges of the view) and a mask (n, h, w), True where that location lies inside dst.
    """
    h, w = size
    src_t = torch.as_tensor(src, dtype=torch.float64)
    dst_t = torch.as_tensor(dst, dtype=torch.float64)
    gy = (torch.arange(h, dtype=torch.float64) + 0.5) / h  # cell centres as a fraction of the view side
    gx = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    px = src_t[:, 0, None] + gx[None] * src_t[:, 2, None]  # (n, w) level-0 x of src's cell centres
    py = src_t[:, 1, None] + gy[None] * src_t[:, 2, None]
    u = 2.0 * (px - dst_t[:, 0, None]) / dst_t[:, 2, None] - 1.0
    v = 2.0 * (py - dst_t[:, 1, None]) / dst_t[:, 2, None] - 1.0
    grid = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1)
    inside = (grid.abs() <= 1.0).all(dim=-1)
    return grid.float(), inside


def dense_nt_xent(qa: Tensor, kb: Tensor, grid: Tensor, inside: Tensor, temperature: float) -> Tensor:
    """Cell-level InfoNCE from view A to view B.

    qa, kb: projected cell maps (n, c, h, w) of views A and B; grid/inside: :func:`cell_grid` of A in B.
    Each cell of A whose location lies inside B must pick B's feature resampled at that location among the
    resampled features of the other spots' cells; cells of its own spot are masked out, neither positive nor
    negative, so that neighbouring tissue of one spot is not pushed apart.
    """
    n, c, h, w = qa.shape
    kb_at_a = _resample(kb, grid)
    q = F.normalize(qa.float().permute(0, 2, 3, 1).reshape(n * h * w, c), dim=1)
    k = F.normalize(kb_at_a.permute(0, 2, 3, 1).reshape(n * h * w, c), dim=1)
    valid = inside.reshape(-1).to(q.device)
    q, k = q[valid], k[valid]
    spot = torch.arange(n, device=q.device).repeat_interleave(h * w)[valid]
    sim = q @ k.t() / temperature
    same = spot[:, None] == spot[None, :]
    sim = sim.masked_fill(same & ~torch.eye(len(spot), dtype=torch.bool, device=q.device), float("-inf"))
    return F.cross_entropy(sim, torch.arange(len(spot), device=q.device))


def dense_cosine(fa: Tensor, fb: Tensor, grid: Tensor, inside: Tensor) -> Tensor:
    """1 - mean cosine between each cell of view A and view B's map resampled at the same place (cells whose
    place lies inside B only); fa, fb: (n, c, h, w); grid/inside: :func:`cell_grid` of A in B."""
    cos = F.cosine_similarity(fa.float(), _resample(fb, grid), dim=1)  # (n, h, w)
    return 1.0 - cos[inside.to(cos.device)].mean()


def _resample(fmap: Tensor, grid: Tensor) -> Tensor:
    """``fmap`` (n, c, h, w) read bilinearly at the :func:`cell_grid` locations."""
    return F.grid_sample(fmap.float(), grid.to(fmap.device), mode="bilinear", padding_mode="border",
                         align_corners=False)


def dense_term(zmap: Tensor, boxes: np.ndarray, cfg: PretrainConfig) -> Tensor:
    """The configured dense loss, symmetric in the two views; zmap stacks views A then B, boxes is (2, n, 3)."""
    n = zmap.shape[0] // 2
    size = (zmap.shape[2], zmap.shape[3])
    total = zmap.new_zeros(())
    for (fa, fb), (src, dst) in (((zmap[:n], zmap[n:]), (boxes[0], boxes[1])),
                                 ((zmap[n:], zmap[:n]), (boxes[1], boxes[0]))):
        grid, inside = cell_grid(src, dst, size)
        if cfg.dense_loss == "cosine":
            total = total + dense_cosine(fa, fb, grid, inside)
        else:
            total = total + dense_nt_xent(fa, fb, grid, inside, cfg.temperature)
    return 0.5 * total


def _to_tensor(batch: np.ndarray, device: torch.device) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(DEFAULT_NORMALIZATION["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(DEFAULT_NORMALIZATION["std"], device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:  # linear warm-up, then cosine to 0 at the last step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def _rng_states() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                          "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_states(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((st["python_version"], tuple(st["python"]), st["python_gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _epoch_seed(seed: int, epoch: int) -> list[int]:
    return [int(seed), int(epoch), 104729]


# ----------------------------------------------------------------------------------------- main loop


def pretrain(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: PretrainConfig,
    *,
    device: str | torch.device = "auto",
    amp: bool | None = None,
    resume: bool = False,
    backend: str = "auto",
    mpp: float | None = None,
    stop_after_epoch: int | None = None,
    threads: int | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> PretrainResult:
    """Train per ``config`` and write ``model.pt`` (project weights format), ``checkpoint.pt``, ``log.csv``,
    ``epochs.csv`` and ``loss.png`` into ``out_dir``.

    ``inputs``: slides/images (ssl) or one class-folder root (supervised). ``amp`` defaults to on for CUDA
    (bf16 where supported, else fp16 with loss scaling) and off elsewhere. ``resume`` continues from
    ``out_dir/checkpoint.pt``; its config must equal ``config``. ``stop_after_epoch`` ends this call early
    (as an interruption would) and leaves a resumable checkpoint.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _pretrain(inputs, out_dir, config, device=device, amp=amp, resume=resume, backend=backend, mpp=mpp,
                         stop_after_epoch=stop_after_epoch, on_step=on_step)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: PretrainConfig,
    *,
    device: str | torch.device,
    amp: bool | None,
    resume: bool,
    backend: str,
    mpp: float | None,
    stop_after_epoch: int | None,
    on_step: Callable[[StepInfo], None] | None,
) -> PretrainResult:
    from equiseg_wsi.features import resolve_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp and dev.type == "cuda")
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    ssl = config.mode == "ssl"

    # ---- data
    views: SlideViews | None = None
    classes: list[str] = []
    items: list[tuple[Path, int]] = []
    train_idx: list[int] = []
    val_idx: list[int] = []
    if ssl:
        if not inputs:
            raise InputError("ssl mode needs at least one slide or image")
        views = SlideViews(inputs, config, backend=backend, mpp=mpp)
        data = {"mode": "ssl", **views.summary()}
        steps_per_epoch = config.steps_per_epoch
    else:
        if len(inputs) != 1:
            raise InputError("supervised mode takes exactly one ROOT folder holding <class>/ sub-folders")
        classes, items = scan_class_folder(inputs[0])
        train_idx, val_idx = _split(items, config.val_fraction, config.seed)
        data = {
            "mode": "supervised", "root": Path(inputs[0]).name, "classes": classes,
            "train_tiles": {c: sum(1 for i in train_idx if items[i][1] == k) for k, c in enumerate(classes)},
            "val_tiles": {c: sum(1 for i in val_idx if items[i][1] == k) for k, c in enumerate(classes)},
        }
        steps_per_epoch = max(1, len(train_idx) // config.batch_size)
        val_tiles = np.stack([_load_tile(items[i][0], config.tile) for i in val_idx])
        val_labels = np.array([items[i][1] for i in val_idx])
    total_steps = config.epochs * steps_per_epoch

    # ---- model and optimiser (built from the seed, then possibly overwritten by the checkpoint)
    torch.manual_seed(config.seed)
    spec = config.arch_spec(num_classes=0 if ssl else len(classes))
    backbone = build_model(spec, seed=config.seed)
    if config.arch == "sre":
        set_forward_path(backbone, config.forward_path)
    dense_head = ssl and config.dense_weight > 0 and config.dense_loss == "infonce"
    net = TrainingNet(backbone, config.proj_dim, ssl, dense=dense_head).to(dev)
    for head, offset in ((net.head, 1), (net.dense_head, 2)):
        if head is None:
            continue
        g = torch.Generator().manual_seed(config.seed + offset)
        with torch.no_grad():
            for m in head.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    bound = 1.0 / m.weight[0].numel() ** 0.5
                    m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound)
                    m.bias.zero_()
        head.to(dev)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    ckpt_path = out / CHECKPOINT_NAME
    start_epoch, step, elapsed = 0, 0, 0.0
    log_rows: list[dict[str, Any]] = []
    epoch_rows: list[dict[str, Any]] = []
    if resume:
        if not ckpt_path.is_file():
            raise InputError(f"{ckpt_path}: no checkpoint to resume from")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = PretrainConfig.from_dict(ck["config"]).to_dict()  # checkpoints from before the dense term: off
        if saved != config.to_dict():
            diff = sorted(k for k in saved if saved[k] != config.to_dict().get(k))
            raise InputError(f"{ckpt_path}: checkpoint was made with other options ({', '.join(diff)}); "
                             "resume with the same options")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        _set_rng_states(ck["rng"])
        start_epoch, step, elapsed = int(ck["epoch"]), int(ck["step"]), float(ck["seconds"])
        log_rows, epoch_rows = list(ck["log"]), list(ck["epochs"])

    def save_checkpoint(epoch: int) -> None:
        obj = {"config": config.to_dict(), "epoch": epoch, "step": step, "seconds": elapsed,
               "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
               "scaler": scaler.state_dict(), "rng": _rng_states(), "log": log_rows, "epochs": epoch_rows}
        tmp = ckpt_path.with_suffix(".pt.tmp")
        torch.save(obj, tmp)
        os.replace(tmp, ckpt_path)

    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, int(stop_after_epoch))
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, last_epoch):
        t0 = time.perf_counter()
        rng = np.random.default_rng(_epoch_seed(config.seed, epoch))
        torch.manual_seed(int(rng.integers(2**62)))
        net.train()
        losses, dense_losses = [], []
        order = rng.permutation(train_idx) if not ssl else None
        for i in range(steps_per_epoch):
            if ssl:
                assert views is not None
                a, b, boxes = views.batch(config.batch_size, rng)
                x = _to_tensor(np.concatenate([a, b]), dev)
            else:
                assert order is not None
                chosen = order[i * config.batch_size : (i + 1) * config.batch_size]
                tiles = [_augment(_random_resized(_load_tile(items[j][0], config.tile), config.tile, rng),
                                  config, rng) for j in chosen]
                x = _to_tensor(np.stack(tiles), dev)
                y = torch.tensor([items[j][1] for j in chosen], device=dev)
            with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=use_amp):
                z, zmap = net.embed(x)
            if ssl:
                n = z.shape[0] // 2
                loss = nt_xent(z[:n], z[n:], config.temperature)
                if zmap is not None and config.dense_weight > 0:
                    dense_loss = dense_term(zmap, boxes, config)
                    dense_losses.append(float(dense_loss.item()))
                    loss = loss + config.dense_weight * dense_loss
            else:
                loss = F.cross_entropy(z.float(), y)
            if not torch.isfinite(loss):
                raise InputError(f"training diverged at step {step + 1} (loss {loss.item()}); lower --lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            step += 1
            lv = float(loss.item())
            losses.append(lv)
            log_row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "loss": lv, "lr": lr}
            if dense_losses:
                log_row["dense_loss"] = dense_losses[-1]
            log_row["seconds"] = round(elapsed + time.perf_counter() - t0, 3)
            log_rows.append(log_row)
            if on_step is not None:
                on_step(StepInfo(epoch + 1, config.epochs, step, total_steps, lv, lr))
        row: dict[str, Any] = {"epoch": epoch + 1, "mean_loss": float(np.mean(losses))}
        if dense_losses:
            row["mean_dense_loss"] = float(np.mean(dense_losses))
        if not ssl:
            row.update(_evaluate(net.backbone, val_tiles, val_labels, dev))
        elapsed += time.perf_counter() - t0
        row["seconds"] = round(elapsed, 3)
        epoch_rows.append(row)
        save_checkpoint(epoch + 1)
        _write_csv(out / LOG_NAME, log_rows)
        _write_csv(out / EPOCHS_NAME, epoch_rows)
    if views is not None:
        views.close()
    epochs_done = max(start_epoch, last_epoch)
    finished = epochs_done >= config.epochs
    if epoch_rows:
        metrics = {k: float(v) for k, v in epoch_rows[-1].items() if k not in ("epoch",)}
    plot = _plot(out / PLOT_NAME, log_rows, epoch_rows) if log_rows else None
    weights = out / MODEL_NAME
    if finished:
        if config.arch == "sre":
            set_forward_path(net.backbone, "auto")
        _save_model(weights, net.backbone.cpu().eval(), spec, config, data, metrics, elapsed, classes,
                    dev, use_amp)
    return PretrainResult(weights=weights, checkpoint=ckpt_path, log_csv=out / LOG_NAME,
                          epochs_csv=out / EPOCHS_NAME, plot=plot, metrics=metrics, seconds=elapsed,
                          epochs_done=epochs_done, finished=finished, data=data)


@torch.no_grad()
def predict_tiles(model: ResNetFeatures, tiles: np.ndarray, device: torch.device | str = "cpu",
                  batch_size: int = 32) -> np.ndarray:
    """Class predictions of a model with a head for uint8 tiles ``[N, H, W, 3]`` (eval mode, fp32)."""
    model = model.eval()
    dev = torch.device(device)
    out = []
    for s in range(0, len(tiles), batch_size):
        out.append(model(_to_tensor(tiles[s : s + batch_size], dev)).argmax(1).cpu().numpy())
    return np.concatenate(out)


def _evaluate(model: ResNetFeatures, tiles: np.ndarray, labels: np.ndarray, dev: torch.device) -> dict[str, float]:
    """Validation accuracy at 0/90/180/270° and the share of tiles predicted alike at all four turns."""
    was_training = model.training
    preds = [predict_tiles(model, np.ascontiguousarray(np.rot90(tiles, k, axes=(1, 2))), dev) for k in range(4)]
    model.train(was_training)
    row = {"val_acc": float(np.mean(preds[0] == labels))}
    for k in (1, 2, 3):
        row[f"val_acc_rot{90 * k}"] = float(np.mean(preds[k] == labels))
    row["val_rot_agreement"] = float(np.mean(np.all([p == preds[0] for p in preds], axis=0)))
    return row


def _save_model(path: Path, backbone: ResNetFeatures, spec: ArchSpec, cfg: PretrainConfig, data: dict[str, Any],
                metrics: dict[str, float], seconds: float, classes: list[str], dev: torch.device,
                use_amp: bool) -> None:
    from equiseg_wsi import __version__

    if cfg.save_dtype == "float16":
        backbone = backbone.half()
    provenance = {
        "created_by": f"equiseg pretrain (equiseg-wsi {__version__})",
        "method": _method(cfg),
        "stored_dtype": cfg.save_dtype,
    }
    training = {
        "options": cfg.to_dict(),
        "data": data,
        "final_metrics": metrics,
        "training_seconds": round(seconds, 1),
        "device": dev.type,
        "mixed_precision": use_amp,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if classes:
        training["classes"] = classes
    # plain Python types only (numpy scalars would make the file unloadable with weights_only=True)
    training = json.loads(json.dumps(training, default=float))
    save_weights(path, backbone, spec, normalization=DEFAULT_NORMALIZATION, layer="layer4",
                 provenance=provenance, training=training)
    if cfg.save_dtype == "float16":
        backbone.float()


def _method(cfg: PretrainConfig) -> str:
    if cfg.mode != "ssl":
        return "supervised cross-entropy"
    if cfg.dense_weight > 0:
        term = "cosine consistency of matched layer4 cells" if cfg.dense_loss == "cosine" else "cell-level InfoNCE"
        return f"SimCLR NT-Xent on pooled layer4 features + {cfg.dense_weight:g} x dense {term}"
    return "SimCLR NT-Xent on pooled layer4 features"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _plot(path: Path, log_rows: list[dict[str, Any]], epoch_rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log_rows]
    loss = [r["loss"] for r in log_rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.6, label="loss per step")
    per_epoch = [r["step"] for r in log_rows]
    ends = {}
    for s, r in zip(per_epoch, log_rows, strict=True):
        ends[r["epoch"]] = s
    ax.plot([ends[r["epoch"]] for r in epoch_rows], [r["mean_loss"] for r in epoch_rows], "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def config_json(cfg: PretrainConfig) -> str:
    """The options as one JSON line (for logs and the model card)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)
