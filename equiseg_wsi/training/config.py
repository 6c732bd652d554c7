"""The options of a training run and what a run reports: stored in the weights file and the checkpoint, so
they are the single place where a default or a validation rule lives."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equiseg_wsi.errors import InputError
from equiseg_wsi.models.arch import DEFAULT_ARCH
from equiseg_wsi.models.resnet import ArchSpec

__all__ = ["DENSE_LOSSES", "LAYOUTS", "MODES", "PretrainConfig", "PretrainResult", "StepInfo"]

MODES = ("ssl", "supervised")
DENSE_LOSSES = ("infonce", "cosine")
_RESNET18 = ArchSpec()
# Network layouts by name: (stem kernel, ring/kernel sizes per stage, blocks per stage, default widths).
# "compact" is the packaged models' layout (DEFAULT_ARCH); "resnet18" the published SRE-ResNet-18.
LAYOUTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "compact": (DEFAULT_ARCH.stem_kernel, DEFAULT_ARCH.kernel_sizes, DEFAULT_ARCH.blocks, DEFAULT_ARCH.widths),
    "resnet18": (_RESNET18.stem_kernel, _RESNET18.kernel_sizes, _RESNET18.blocks, _RESNET18.widths),
}


@dataclass(frozen=True)
class PretrainConfig:
    """Every option that changes the result (stored in the weights file); units in the names or docs.

    widths, stem_kernel, kernel_sizes, blocks: the network; the defaults are the packaged models' layout
        (`DEFAULT_ARCH`: one block per stage, 5/5/5/3-px rings, 16-128 channels), so a trained file is a drop-in
        `--weights` for the defaults of `equiseg run` (halo, speed). `LAYOUTS["resnet18"]` is the published one.
    tile: network input side in px (a multiple of 8 keeps rot90 equivariance exact through the poolings).
    mpp_min/mpp_max: ssl views are read at a log-uniform µm/px in this range (`equiseg run` defaults to 1.0).
    steps_per_epoch: ssl only (an epoch of supervised training is one pass over the training tiles).
    region: ssl only, level-0 rectangle (x, y, w, h) of every input from which views may be read (the whole
        view, not only its centre, stays inside), e.g. to hold out part of an image for evaluation.
    forward_path: SRE forward path during training ("dense" measured fastest for training on CPU and is
        what cuDNN runs on GPU); inference keeps choosing its own fastest exact path.
    dense_weight: ssl only, weight of the dense (per-cell) term added to the pooled NT-Xent. 0 (default) =
        pooled SimCLR only, the last self-supervised packaged model's recipe: no dense head is built.
        Off by default because neither dense variant beat it on the validation rows (docs/model_card.md).
    dense_loss: "infonce" (projected cells, other spots' cells as negatives) or "cosine" (raw layer4 cells,
        matched cells pulled together, no negatives); see :mod:`equiseg_wsi.pretrain`.
    border_prob: probability that a view gets a synthetic tissue border (see
        :func:`equiseg_wsi.training.augment.tissue_border`); 0.5 as in the recipe of the last self-supervised
        packaged model (docs/model_card.md); 0 draws nothing, so older recipes reproduce exactly.
    """

    mode: str = "ssl"
    arch: str = "sre"
    widths: tuple[int, ...] = DEFAULT_ARCH.widths
    stem_kernel: int = DEFAULT_ARCH.stem_kernel
    kernel_sizes: tuple[int, ...] = DEFAULT_ARCH.kernel_sizes
    blocks: tuple[int, ...] = DEFAULT_ARCH.blocks
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
    border_prob: float = 0.5
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
        if not len(self.widths) == len(self.kernel_sizes) == len(self.blocks) or min(self.widths, default=0) < 1:
            raise InputError(f"widths {self.widths}, kernel_sizes {self.kernel_sizes} and blocks {self.blocks} must "
                             "give every stage a positive width")

    def arch_spec(self, num_classes: int = 0) -> ArchSpec:
        return ArchSpec(kind=self.arch, widths=tuple(self.widths), stem_kernel=self.stem_kernel,
                        kernel_sizes=tuple(self.kernel_sizes), blocks=tuple(self.blocks), num_classes=num_classes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("widths", "kernel_sizes", "blocks"):
            d[key] = list(getattr(self, key))
        d["region"] = list(self.region) if self.region is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        kw = dict(d)
        kw.setdefault("dense_weight", 0.0)  # files written before the dense term trained without it
        kw.setdefault("dense_loss", "infonce")
        kw.setdefault("border_prob", 0.0)  # files written before the border augmentation trained without it
        # files written before the layout was an option trained the published SRE-ResNet-18 layout
        kw.setdefault("stem_kernel", _RESNET18.stem_kernel)
        kw.setdefault("kernel_sizes", _RESNET18.kernel_sizes)
        kw.setdefault("blocks", _RESNET18.blocks)
        for key in ("widths", "kernel_sizes", "blocks"):
            kw[key] = tuple(kw[key])
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
