"""Optimiser, schedule and the checkpoint: what an interrupted run needs to continue with exactly the losses
of an uninterrupted one.

A checkpoint after every epoch holds model, heads, optimizer, scheduler, AMP scaler, RNG states and the log;
every random draw of an epoch comes from generators seeded by ``(seed, epoch)`` (:func:`epoch_seed`), so
the RNG states only matter for code outside those generators.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from equiseg_wsi.errors import InputError
from equiseg_wsi.models.weights import write_torch_file
from equiseg_wsi.training.config import PretrainConfig
from equiseg_wsi.training.net import TrainingNet

__all__ = ["TrainState", "epoch_seed", "load_checkpoint", "new_state", "save_checkpoint"]


@dataclass
class TrainState:
    """The network with its optimisation state, the progress counters and the rows of both logs."""

    net: TrainingNet
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs finished
    step: int = 0  # optimiser steps taken
    elapsed: float = 0.0  # training seconds over all calls
    log_rows: list[dict[str, Any]] = field(default_factory=list)
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:  # linear warm-up, then cosine to 0 at the last step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def new_state(net: TrainingNet, cfg: PretrainConfig, total_steps: int, *, fp16_scaling: bool) -> TrainState:
    """AdamW (no weight decay on biases and norms), warm-up + cosine schedule, and the loss scaler (on only
    for fp16 autocast)."""
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=fp16_scaling)
    return TrainState(net, opt, sched, scaler)


def epoch_seed(seed: int, epoch: int) -> list[int]:
    """Seed of the generator that draws all of one epoch's data order, views and augmentations."""
    return [int(seed), int(epoch), 104729]


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


def save_checkpoint(path: Path, cfg: PretrainConfig, state: TrainState) -> None:
    """Write the checkpoint atomically: an interruption leaves the previous epoch's checkpoint intact."""
    obj = {"config": cfg.to_dict(), "epoch": state.epoch, "step": state.step, "seconds": state.elapsed,
           "model": state.net.state_dict(), "optimizer": state.opt.state_dict(),
           "scheduler": state.sched.state_dict(), "scaler": state.scaler.state_dict(), "rng": _rng_states(),
           "log": state.log_rows, "epochs": state.epoch_rows}
    write_torch_file(path, obj)


def load_checkpoint(path: Path, cfg: PretrainConfig, state: TrainState) -> None:
    """Restore ``state`` and the RNG states from ``path``; its options must equal ``cfg``."""
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint to resume from")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    saved = PretrainConfig.from_dict(ck["config"]).to_dict()  # checkpoints from before the dense term: off
    if saved != cfg.to_dict():
        diff = sorted(k for k in saved if saved[k] != cfg.to_dict().get(k))
        raise InputError(f"{path}: checkpoint was made with other options ({', '.join(diff)}); "
                         "resume with the same options")
    state.net.load_state_dict(ck["model"])
    state.opt.load_state_dict(ck["optimizer"])
    state.sched.load_state_dict(ck["scheduler"])
    state.scaler.load_state_dict(ck["scaler"])
    _set_rng_states(ck["rng"])
    state.epoch, state.step, state.elapsed = int(ck["epoch"]), int(ck["step"]), float(ck["seconds"])
    state.log_rows, state.epoch_rows = list(ck["log"]), list(ck["epochs"])
