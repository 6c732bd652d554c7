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
  **Tissue borders** (``border_prob``, default 0.5): a view gets, with that probability, a straight edge beyond
  which it shows empty glass (10-50 % of the view; :func:`equiseg_wsi.training.augment.tissue_border`). Views
  are centred on tissue, so without it the network rarely sees glass beside tissue, while every segmentation
  cell near an edge does, and K-means spent a cluster on a rim around the tissue. The last self-supervised
  packaged model used 0.5 (docs/model_card.md, history), hence the default.
  **No rotation augmentation** by default: an SRE network is rotation-equivariant by construction (exactly
  for 90° turns and flips, closely at other angles) and its pooled features are therefore already invariant;
  a rotated view carries no new information and would only cost compute. ``rotate_augment=True`` adds
  random 90° turns and flips, e.g. to give the standard twin invariance learnt from data. (The packaged
  models are not made by this loop: they were trained with dense gland-mask supervision,
  ``scripts/train_default_model.py`` / :mod:`equiseg_wsi.training.masks`, which turns and flips every crop for
  both kinds. What this loop shares with that recipe by default: the network layout, ``DEFAULT_ARCH``, and the
  HED stain and brightness/contrast jitter.)
* ``supervised``: cross-entropy on ``ROOT/<class>/*.png|jpg|tif`` (the NCT-CRC-HE-100K layout), with a
  seeded stratified validation split; accuracy is reported at 0/90/180/270° of the validation tiles.

Resume: a checkpoint after every epoch holds model, head, optimizer, scheduler, AMP scaler, RNG states and
the log; all randomness of an epoch (data order, views, augmentations) is drawn from generators seeded by
``(seed, epoch)``, so a resumed run continues with exactly the losses of an uninterrupted one (same
machine, same thread count).

This module is the loop; its parts live in :mod:`equiseg_wsi.training` (options, data and augmentation,
losses, network, checkpoint, outputs) and the names a user needs are re-exported here.
The library never prints: progress goes to ``on_step``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from equiseg_wsi.errors import InputError
from equiseg_wsi.models.resnet import ArchSpec
from equiseg_wsi.models.sre_conv import set_forward_path
from equiseg_wsi.training.augment import hed_to_rgb, rgb_to_hed
from equiseg_wsi.training.config import PretrainConfig, PretrainResult, StepInfo
from equiseg_wsi.training.data import CLASS_SUFFIXES, SlideViews, TrainingData, load_training_data, scan_class_folder
from equiseg_wsi.training.losses import cell_grid, dense_cosine, dense_nt_xent, dense_term, nt_xent
from equiseg_wsi.training.net import TrainingNet, build_training_net, evaluate, predict_tiles, to_tensor
from equiseg_wsi.training.outputs import plot_losses, save_model, write_logs
from equiseg_wsi.training.state import TrainState, epoch_seed, load_checkpoint, new_state, save_checkpoint

__all__ = [
    "CLASS_SUFFIXES",
    "PretrainConfig",
    "PretrainResult",
    "SlideViews",
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

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
LOG_NAME = "log.csv"
EPOCHS_NAME = "epochs.csv"
PLOT_NAME = "loss.png"


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


@dataclass
class _Run:
    """What every step of one call needs: options, data, training state, device and precision."""

    cfg: PretrainConfig
    data: TrainingData
    spec: ArchSpec
    state: TrainState
    dev: torch.device
    use_amp: bool
    amp_dtype: torch.dtype
    total_steps: int
    on_step: Callable[[StepInfo], None] | None


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
    data = load_training_data(inputs, config, backend=backend, mpp=mpp)
    try:
        total_steps = config.epochs * data.steps_per_epoch
        # model and optimiser are built from the seed, then possibly overwritten by the checkpoint
        spec = config.arch_spec(num_classes=len(data.classes) if config.mode != "ssl" else 0)
        net = build_training_net(config, spec, dev)
        state = new_state(net, config, total_steps, fp16_scaling=use_amp and amp_dtype == torch.float16)
        if resume:
            load_checkpoint(out / CHECKPOINT_NAME, config, state)
        run = _Run(config, data, spec, state, dev, use_amp, amp_dtype, total_steps, on_step)
        start_epoch = state.epoch
        last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, int(stop_after_epoch))
        for epoch in range(start_epoch, last_epoch):
            _train_epoch(run, epoch)
            save_checkpoint(out / CHECKPOINT_NAME, config, state)
            write_logs(out / LOG_NAME, out / EPOCHS_NAME, state.log_rows, state.epoch_rows)
    finally:
        data.close()
    return _finish(run, out, max(start_epoch, last_epoch))


def _train_epoch(run: _Run, epoch: int) -> None:
    """One epoch (0-based), all its randomness drawn from the epoch's own seed; appends its log rows."""
    cfg, state = run.cfg, run.state
    t0 = time.perf_counter()
    rng = np.random.default_rng(epoch_seed(cfg.seed, epoch))
    torch.manual_seed(int(rng.integers(2**62)))
    state.net.train()
    losses: list[float] = []
    dense_losses: list[float] = []
    order = rng.permutation(run.data.train_idx) if cfg.mode != "ssl" else None
    for i in range(run.data.steps_per_epoch):
        batch = order[i * cfg.batch_size : (i + 1) * cfg.batch_size] if order is not None else None
        loss, dense = _batch_loss(run, batch, rng)
        lr = _optimise(state, loss)
        lv = float(loss.item())
        losses.append(lv)
        log_row: dict[str, float | int] = {"epoch": epoch + 1, "step": state.step, "loss": lv, "lr": lr}
        if dense is not None:
            dense_losses.append(dense)
            log_row["dense_loss"] = dense
        log_row["seconds"] = round(state.elapsed + time.perf_counter() - t0, 3)
        state.log_rows.append(log_row)
        if run.on_step is not None:
            run.on_step(StepInfo(epoch + 1, cfg.epochs, state.step, run.total_steps, lv, lr))
    row: dict[str, float | int] = {"epoch": epoch + 1, "mean_loss": float(np.mean(losses))}
    if dense_losses:
        row["mean_dense_loss"] = float(np.mean(dense_losses))
    if run.data.val_tiles is not None and run.data.val_labels is not None:
        row.update(evaluate(state.net.backbone, run.data.val_tiles, run.data.val_labels, run.dev))
    state.elapsed += time.perf_counter() - t0
    row["seconds"] = round(state.elapsed, 3)
    state.epoch_rows.append(row)
    state.epoch = epoch + 1


def _batch_loss(run: _Run, chosen: np.ndarray | None, rng: np.random.Generator) -> tuple[Tensor, float | None]:
    """The loss of one batch (ssl: fresh view pairs; supervised: the training items ``chosen``) and the
    dense term's value when it is on."""
    cfg, dev = run.cfg, run.dev
    if chosen is None:
        assert run.data.views is not None
        a, b, boxes = run.data.views.batch(cfg.batch_size, rng)
        x = to_tensor(np.concatenate([a, b]), dev)
    else:
        tiles, labels = run.data.class_batch(chosen, cfg, rng)
        x = to_tensor(tiles, dev)
        y = torch.tensor(labels, device=dev)
    with torch.autocast(device_type=dev.type, dtype=run.amp_dtype, enabled=run.use_amp):
        z, zmap = run.state.net.embed(x)
    if chosen is not None:
        return F.cross_entropy(z.float(), y), None
    n = z.shape[0] // 2
    loss = nt_xent(z[:n], z[n:], cfg.temperature)
    if zmap is None or cfg.dense_weight <= 0:
        return loss, None
    dense_loss = dense_term(zmap, boxes, cfg)
    return loss + cfg.dense_weight * dense_loss, float(dense_loss.item())


def _optimise(state: TrainState, loss: Tensor) -> float:
    """One optimiser and schedule step on ``loss``; returns the learning rate that step used."""
    if not torch.isfinite(loss):
        raise InputError(f"training diverged at step {state.step + 1} (loss {loss.item()}); lower --lr")
    state.opt.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
    state.scaler.step(state.opt)
    state.scaler.update()
    lr = float(state.opt.param_groups[0]["lr"])
    state.sched.step()
    state.step += 1
    return lr


def _finish(run: _Run, out: Path, epochs_done: int) -> PretrainResult:
    """Plot the losses and, once every epoch is done, save the model; report where everything is."""
    cfg, state = run.cfg, run.state
    finished = epochs_done >= cfg.epochs
    metrics: dict[str, float] = {}
    if state.epoch_rows:
        metrics = {k: float(v) for k, v in state.epoch_rows[-1].items() if k not in ("epoch",)}
    plot = plot_losses(out / PLOT_NAME, state.log_rows, state.epoch_rows) if state.log_rows else None
    weights = out / MODEL_NAME
    if finished:
        if cfg.arch == "sre":
            set_forward_path(state.net.backbone, "auto")
        save_model(weights, state.net.backbone.cpu().eval(), run.spec, cfg, run.data.summary, metrics,
                   state.elapsed, run.data.classes, run.dev, run.use_amp)
    return PretrainResult(weights=weights, checkpoint=out / CHECKPOINT_NAME, log_csv=out / LOG_NAME,
                          epochs_csv=out / EPOCHS_NAME, plot=plot, metrics=metrics, seconds=state.elapsed,
                          epochs_done=epochs_done, finished=finished, data=run.data.summary)
