"""Dense supervised training on tiles with tissue masks (e.g. gland / stroma): features that follow tissue.

Why: a network pretrained self-supervised on one skin region gives cell features that separate colon glands
from stroma no better than the cells' colour does (a classifier on its frozen ``layer4`` cells scores below
colour KMeans on the EBHI-Seg development cases). Teaching the backbone itself which cells are gland makes the
unsupervised KMeans on its ``layer4`` cells split tissue along that boundary, while every layer stays an SRE
convolution (exact 90° / flip equivariance is a property of the architecture, not of the weights).

Recipe: random square crops, random 90° turn and flip, HED stain and brightness/contrast jitter; a 1x1
convolution on ``layer4`` predicts, for each feature cell, the share of its pixels that the mask marks
(binary cross entropy with that soft target). The head is training-only: the saved weights are the backbone.

Reproducible and resumable: every step draws from ``default_rng([seed, step])`` and there is no dropout, so a
run stopped after a checkpoint and resumed ends with the same weights as one that never stopped. Checkpoints
(model, optimiser, step, best selection loss) are written atomically every ``eval_every`` steps; the weights
kept are those with the lowest cross entropy on the selection tiles (cases disjoint from the training ones).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from equiseg_wsi.errors import InputError
from equiseg_wsi.models.arch import DEFAULT_ARCH
from equiseg_wsi.models.resnet import ArchSpec, ResNetFeatures, build_model
from equiseg_wsi.models.sre_conv import set_forward_path
from equiseg_wsi.models.weights import save_weights, write_torch_file
from equiseg_wsi.training.augment import colour_jitter
from equiseg_wsi.training.config import PretrainConfig
from equiseg_wsi.training.net import to_tensor

__all__ = ["MaskPair", "MaskTrainConfig", "MaskTrainResult", "load_pairs", "train_on_masks"]


@dataclass(frozen=True)
class MaskTrainConfig:
    """Every option that changes the result (stored in the weights file); kind "standard" trains the twin."""

    kind: str = "sre"
    widths: tuple[int, ...] = DEFAULT_ARCH.widths
    kernel_sizes: tuple[int, ...] = DEFAULT_ARCH.kernel_sizes
    blocks: tuple[int, ...] = DEFAULT_ARCH.blocks
    stem_kernel: int = DEFAULT_ARCH.stem_kernel
    crop: int = 128  # px, a multiple of 8 (one target per 8 x 8 cell)
    batch_size: int = 16
    steps: int = 2000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    eval_every: int = 200
    hed_sigma: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop < 16 or self.crop % 8:
            raise InputError(f"crop must be a multiple of 8 and >= 16 px, got {self.crop}")
        if self.kind not in ("sre", "standard"):
            raise InputError(f"kind must be 'sre' or 'standard', got {self.kind!r}")
        if self.steps < 1 or self.eval_every < 1 or self.batch_size < 1:
            raise InputError("steps, eval_every and batch_size must be >= 1")

    def arch(self) -> ArchSpec:
        return ArchSpec(kind=self.kind, widths=self.widths, kernel_sizes=self.kernel_sizes, blocks=self.blocks,
                        stem_kernel=self.stem_kernel)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class MaskPair:
    image: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool
    case: str


@dataclass
class MaskTrainResult:
    weights: Path
    checkpoint: Path
    log: list[dict[str, float]]
    best_step: int
    seconds: float


def load_pairs(rows: Sequence[tuple[str | Path, str | Path, str]]) -> list[MaskPair]:
    """(image, mask, case) files -> pairs in memory; the mask is true where its pixel value is above half."""
    pairs = []
    for image, mask, case in rows:
        rgb = np.asarray(Image.open(image).convert("RGB"))
        m = np.asarray(Image.open(mask).convert("L")) > 127
        if m.shape != rgb.shape[:2]:
            raise InputError(f"{mask}: mask is {m.shape[1]} x {m.shape[0]} px, "
                             f"image is {rgb.shape[1]} x {rgb.shape[0]}")
        pairs.append(MaskPair(rgb, m, str(case)))
    return pairs


def _cell_targets(masks: np.ndarray) -> torch.Tensor:
    """(n, h, w) bool -> (n, 1, h/8, w/8) share of marked pixels per feature cell."""
    t = torch.from_numpy(masks.astype(np.float32))[:, None]
    return F.avg_pool2d(t, 8)


def _batch(pairs: Sequence[MaskPair], cfg: MaskTrainConfig, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    jitter = PretrainConfig(hed_sigma=cfg.hed_sigma, brightness=cfg.brightness, contrast=cfg.contrast)
    images, masks = [], []
    for i in rng.integers(0, len(pairs), cfg.batch_size):
        p = pairs[int(i)]
        h, w = p.mask.shape
        y, x = int(rng.integers(0, h - cfg.crop + 1)), int(rng.integers(0, w - cfg.crop + 1))
        rgb, m = p.image[y : y + cfg.crop, x : x + cfg.crop], p.mask[y : y + cfg.crop, x : x + cfg.crop]
        k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
        rgb, m = np.rot90(rgb, k), np.rot90(m, k)
        if flip:
            rgb, m = rgb[:, ::-1], m[:, ::-1]
        images.append(colour_jitter(np.ascontiguousarray(rgb), jitter, rng))
        masks.append(np.ascontiguousarray(m))
    return np.stack(images), np.stack(masks)


class _Net(nn.Module):
    def __init__(self, backbone: ResNetFeatures) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.spec.widths[-1], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone.features(x, ("layer4",))["layer4"])
        return out


def _selection_loss(net: _Net, pairs: Sequence[MaskPair], dev: torch.device) -> dict[str, float]:
    """Cell cross entropy and accuracy (cells at least 3/4 one class) on whole selection tiles (side cut to 8)."""
    net.eval()
    total, n, right, counted = 0.0, 0, 0, 0
    with torch.no_grad():
        for p in pairs:
            h, w = (p.mask.shape[0] // 8) * 8, (p.mask.shape[1] // 8) * 8
            logits = net(to_tensor(p.image[None, :h, :w], dev)).cpu()
            target = _cell_targets(p.mask[None, :h, :w])
            total += float(F.binary_cross_entropy_with_logits(logits, target, reduction="sum"))
            n += target.numel()
            pure = (target <= 0.25) | (target >= 0.75)
            right += int(((logits > 0) == (target > 0.5))[pure].sum())
            counted += int(pure.sum())
    net.train()
    return {"select_bce": total / max(n, 1), "select_acc": right / max(counted, 1)}


def _lr(cfg: MaskTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to zero at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def train_on_masks(
    cfg: MaskTrainConfig,
    train: Sequence[MaskPair],
    select: Sequence[MaskPair],
    out: str | Path,
    *,
    provenance: dict[str, Any] | None = None,
    stop_after_s: float | None = None,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> MaskTrainResult:
    """Train (or resume from ``out``/checkpoint.pt) and write ``out``/weights.pt with the selected backbone.

    ``stop_after_s``: stop at the first checkpoint after this many seconds (resume later with the same call).
    """
    if not train or not select:
        raise InputError("need at least one training and one selection tile")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, weights_path = out_dir / "checkpoint.pt", out_dir / "weights.pt"
    dev = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    net = _Net(build_model(cfg.arch(), seed=cfg.seed))
    if cfg.kind == "sre":
        set_forward_path(net.backbone, "dense")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, best, best_step, log, best_state = 0, math.inf, 0, [], None
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["config"] != cfg.to_dict():
            raise InputError(f"{ckpt_path}: checkpoint of another configuration; use a new output folder")
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        step, best, best_step, log, best_state = ck["step"], ck["best"], ck["best_step"], ck["log"], ck["best_state"]
    start = time.perf_counter()
    net.train()
    while step < cfg.steps:
        images, masks = _batch(train, cfg, np.random.default_rng([cfg.seed, step]))
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        loss = F.binary_cross_entropy_with_logits(net(to_tensor(images, dev)), _cell_targets(masks))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = {"step": float(step), "train_bce": float(loss.detach()), **_selection_loss(net, select, dev),
                   "seconds": time.perf_counter() - start}
            log.append(row)
            if row["select_bce"] < best:
                best, best_step = row["select_bce"], step
                best_state = {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}
            write_torch_file(ckpt_path, {"config": cfg.to_dict(), "net": net.state_dict(), "opt": opt.state_dict(),
                                         "step": step, "best": best, "best_step": best_step, "log": log,
                                         "best_state": best_state})
            if on_eval is not None:
                on_eval(row)
            if stop_after_s is not None and time.perf_counter() - start > stop_after_s:
                break
    if step >= cfg.steps and best_state is not None:
        backbone = build_model(cfg.arch())
        backbone.load_state_dict(best_state)
        training = {"recipe": "dense mask supervision (equiseg_wsi.training.masks)", "config": cfg.to_dict(),
                    "best_step": best_step, "log": log, "n_train_tiles": len(train), "n_select_tiles": len(select)}
        save_weights(weights_path, backbone, cfg.arch(), layer="layer4", provenance=provenance, training=training)
    return MaskTrainResult(weights_path, ckpt_path, log, best_step, time.perf_counter() - start)
