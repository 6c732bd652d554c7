"""What a run trains on: pairs of views of random tissue spots of slides (ssl), or the tiles of a class-folder
tree with a seeded stratified validation split (supervised)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from equiseg_wsi.errors import InputError, NoTissueError
from equiseg_wsi.training.augment import augment, random_resized
from equiseg_wsi.training.config import PretrainConfig

__all__ = ["CLASS_SUFFIXES", "SlideViews", "TrainingData", "load_tile", "load_training_data", "scan_class_folder",
           "split_items"]

CLASS_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


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
        return augment(rgb, cfg, rng), (float(x), float(y), float(span))

    def batch(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """View A and view B of the same n spots, two (n, tile, tile, 3) uint8 arrays, and their boxes on the
        slide, (2, n, 3) level-0 x, y (top left) and side: what the dense term needs to match cells."""
        a: list[np.ndarray] = []
        b: list[np.ndarray] = []
        boxes_a: list[tuple[float, float, float]] = []
        boxes_b: list[tuple[float, float, float]] = []
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


def split_items(items: list[tuple[Path, int]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split: at least one validation and one training tile per class."""
    rng = np.random.default_rng([seed, 7919])
    train: list[int] = []
    val: list[int] = []
    labels = np.array([k for _, k in items])
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def load_tile(path: Path, size: int) -> np.ndarray:
    """One class tile as (size, size, 3) uint8 RGB (box-filtered when shrunk, bicubic when enlarged)."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BOX if rgb.width > size else Image.Resampling.BICUBIC)
            return np.asarray(rgb)
    except OSError as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None


@dataclass
class TrainingData:
    """One mode's data as the loop sees it: ssl ``views``, or class ``items`` with their split and the
    validation tiles loaded once; ``summary`` goes into the weights file."""

    summary: dict[str, Any]
    steps_per_epoch: int
    views: SlideViews | None = None
    classes: list[str] = field(default_factory=list)
    items: list[tuple[Path, int]] = field(default_factory=list)
    train_idx: list[int] = field(default_factory=list)
    val_tiles: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    def class_batch(self, chosen: np.ndarray, cfg: PretrainConfig,
                    rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
        """Augmented tiles (n, tile, tile, 3) and labels of the training items ``chosen``."""
        tiles = [augment(random_resized(load_tile(self.items[j][0], cfg.tile), cfg.tile, rng), cfg, rng)
                 for j in chosen]
        return np.stack(tiles), [self.items[j][1] for j in chosen]

    def close(self) -> None:
        if self.views is not None:
            self.views.close()


def load_training_data(inputs: Sequence[str | os.PathLike[str]], cfg: PretrainConfig, *, backend: str,
                       mpp: float | None) -> TrainingData:
    """Open the inputs of ``cfg.mode``: slides/images (ssl) or exactly one class-folder root (supervised)."""
    if cfg.mode == "ssl":
        if not inputs:
            raise InputError("ssl mode needs at least one slide or image")
        views = SlideViews(inputs, cfg, backend=backend, mpp=mpp)
        return TrainingData({"mode": "ssl", **views.summary()}, cfg.steps_per_epoch, views=views)
    if len(inputs) != 1:
        raise InputError("supervised mode takes exactly one ROOT folder holding <class>/ sub-folders")
    classes, items = scan_class_folder(inputs[0])
    train_idx, val_idx = split_items(items, cfg.val_fraction, cfg.seed)
    summary = {
        "mode": "supervised", "root": Path(inputs[0]).name, "classes": classes,
        "train_tiles": {c: sum(1 for i in train_idx if items[i][1] == k) for k, c in enumerate(classes)},
        "val_tiles": {c: sum(1 for i in val_idx if items[i][1] == k) for k, c in enumerate(classes)},
    }
    return TrainingData(
        summary, max(1, len(train_idx) // cfg.batch_size), classes=classes, items=items, train_idx=train_idx,
        val_tiles=np.stack([load_tile(items[i][0], cfg.tile) for i in val_idx]),
        val_labels=np.array([items[i][1] for i in val_idx]),
    )
