"""`equiseg pretrain`: train the SRE-ResNet or its standard twin (self-supervised or supervised)."""

from __future__ import annotations

from pathlib import Path

import click

from equiseg_wsi.pretrain import PretrainConfig, StepInfo
from equiseg_wsi.pretrain import pretrain as run_pretrain
from equiseg_wsi.training.config import LAYOUTS

from .options import backend_option, mpp_option, quiet_option
from .progress import Progress

_DEFAULT = PretrainConfig()


def _region(text: str | None) -> tuple[float, float, float, float] | None:
    if not text:
        return None
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected X,Y,W,H in level-0 px, got {text!r}") from None
    if len(parts) != 4:
        raise click.BadParameter(f"expected X,Y,W,H in level-0 px, got {text!r}")
    return parts


def _widths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if len(values) != 4 or min(values) < 1:
        raise click.BadParameter(f"expected four positive channel counts, got {text!r}")
    return values


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: model.pt (equiseg weights), checkpoint.pt, log.csv, epochs.csv, loss.png.")
@click.option("--mode", type=click.Choice(["ssl", "supervised"]), default="ssl", show_default=True,
              help="ssl: SimCLR on tiles sampled from the tissue of INPUT slides/images (no labels). supervised: "
              "INPUT is one ROOT folder of ROOT/<class>/*.png|jpg|tif tiles (NCT-CRC-HE-100K layout).")
@click.option("--arch", type=click.Choice(["sre", "standard"]), default="sre", show_default=True,
              help="SRE-ResNet-18 (rotation-equivariant ring kernels) or its standard-convolution twin.")
@click.option("--layout", type=click.Choice(list(LAYOUTS)), default="compact", show_default=True,
              help="Network layout. compact: the packaged models' (one block per stage, rings 5/5/5/3, widths "
              "16,32,64,128; trains in minutes on a CPU, and `equiseg run`'s defaults are tuned to it). resnet18: the "
              "published SRE-ResNet-18 (two blocks per stage, rings 9/9/5/5, widths 64,128,256,512; about 8x slower).")
@click.option("--widths", default=None, metavar="W1,W2,W3,W4",
              help="Channels per stage. Default: the layout's (16,32,64,128 for compact).")
@click.option("--tile", type=click.IntRange(min=16), default=_DEFAULT.tile, show_default=True,
              help="Network input side in px (multiple of 8). Supervised tiles are resized to it.")
@click.option("--mpp-range", nargs=2, type=click.FloatRange(min=0, min_open=True),
              default=(_DEFAULT.mpp_min, _DEFAULT.mpp_max), show_default=True,
              help="ssl: each view is read at a log-uniform resolution in this range, µm/px (`equiseg run` "
              "defaults to --target-mpp 1.0).")
@click.option("--region", default=None, metavar="X,Y,W,H",
              help="ssl: read views only inside this level-0 rectangle of every input (px), e.g. to hold out "
              "the rest for evaluation. Default: the whole image.")
@click.option("--batch-size", type=click.IntRange(min=2), default=_DEFAULT.batch_size, show_default=True,
              help="Tiles per step (ssl: spots per step, each giving two views).")
@click.option("--epochs", type=click.IntRange(min=1), default=_DEFAULT.epochs, show_default=True,
              help="Epochs; a checkpoint is written after each.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=_DEFAULT.steps_per_epoch,
              show_default=True, help="ssl only: steps per epoch (supervised: one pass over the training tiles).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_DEFAULT.lr, show_default=True,
              help="Peak AdamW learning rate (linear warm-up, then cosine decay to 0).")
@click.option("--warmup-steps", type=click.IntRange(min=1), default=_DEFAULT.warmup_steps, show_default=True,
              help="Steps of linear learning-rate warm-up.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=_DEFAULT.temperature,
              show_default=True, help="ssl: NT-Xent temperature.")
@click.option("--dense-weight", type=click.FloatRange(min=0), default=_DEFAULT.dense_weight, show_default=True,
              help="ssl: weight of the dense term, a cell-level InfoNCE that makes the layer4 features of the same "
              "tissue location agree between the two views (what segmentation clusters); 0 = pooled SimCLR only, the "
              "recipe of the last self-supervised packaged model (the dense term did not help on its validation rows; "
              "docs/model_card.md).")
@click.option("--dense-loss", type=click.Choice(["infonce", "cosine"]), default=_DEFAULT.dense_loss,
              show_default=True, help="ssl: the dense term. infonce: projected cells against other spots' cells. "
              "cosine: matched raw layer4 cells pulled together, no negatives.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=_DEFAULT.val_fraction, show_default=True,
              help="supervised: share of each class held out for validation (seeded, stratified).")
@click.option("--hed-sigma", type=click.FloatRange(min=0), default=_DEFAULT.hed_sigma, show_default=True,
              help="Stain jitter: each of H, E, DAB scaled by 1±σ and shifted by ±σ (OD units).")
@click.option("--blur-prob", type=click.FloatRange(0, 1), default=_DEFAULT.blur_prob, show_default=True,
              help="Probability of a Gaussian blur (radius 0.1 to 1 px) per view.")
@click.option("--border-prob", type=click.FloatRange(0, 1), default=_DEFAULT.border_prob, show_default=True,
              help="Probability that a view gets a synthetic tissue border: the part beyond a random straight "
              "line (10-50% of the view) becomes empty glass, so features near tissue edges describe the "
              "tissue, not the glass. The default, 0.5, is what the last self-supervised packaged model used "
              "(docs/model_card.md).")
@click.option("--rotate-augment/--no-rotate-augment", default=False, show_default=True,
              help="Random 90° turns and flips. Unneeded for SRE (rotation-equivariant by construction, so "
              "turned views add nothing); off by default so that an SRE-vs-standard comparison isolates the "
              "architecture. (The packaged models' mask-supervised recipe turns and flips every crop, for both kinds.)")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds initialisation, data and augmentation.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="Where to train; auto picks CUDA, then MPS, then CPU.")
@click.option("--amp/--no-amp", default=None,
              help="Mixed precision (bf16, or fp16 with loss scaling). Default: on for CUDA, off elsewhere.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch (default: torch's).")
@click.option("--half-weights", is_flag=True, default=False,
              help="Store model.pt in float16 (half the size; features equal to float32 within rounding).")
@click.option("--resume", is_flag=True, default=False,
              help="Continue from OUT/checkpoint.pt (same options); the continued losses equal an uninterrupted run.")
@click.option("--stop-after-epoch", type=click.IntRange(min=1), default=None, hidden=True,
              help="End after this epoch, leaving a resumable checkpoint (for tests).")
@backend_option
@mpp_option
@quiet_option
def pretrain(inputs: tuple[Path, ...], out_dir: Path, mode: str, arch: str, layout: str, widths: str | None, tile: int,
             mpp_range: tuple[float, float], region: str | None, batch_size: int, epochs: int,
             steps_per_epoch: int, lr: float, warmup_steps: int, temperature: float, dense_weight: float,
             dense_loss: str, val_fraction: float, hed_sigma: float, blur_prob: float, border_prob: float,
             rotate_augment: bool, seed: int, device: str, amp: bool | None, threads: int | None,
             half_weights: bool, resume: bool, stop_after_epoch: int | None, backend: str, mpp: float | None,
             quiet: bool) -> None:
    """Train the feature model on INPUT... and write it in the equiseg weights format (use it with --weights).

    \b
    ssl:        equiseg pretrain --mode ssl slides/ -o runs/ssl
    supervised: equiseg pretrain --mode supervised NCT-CRC-HE-100K/ -o runs/sup --tile 96

    The packaged default model is not made by this command: it was trained with dense gland-mask supervision
    on EBHI-Seg (`python scripts/train_default_model.py`, docs/model_card.md). The defaults here share its
    network layout and its stain and brightness/contrast jitter; the self-supervised options (--border-prob
    0.5, no dense term, no rotations) follow the recipe of the last self-supervised packaged model.
    """
    stem_kernel, kernel_sizes, blocks, layout_widths = LAYOUTS[layout]
    config = PretrainConfig(
        mode=mode, arch=arch, widths=_widths(widths) if widths else layout_widths, stem_kernel=stem_kernel,
        kernel_sizes=kernel_sizes, blocks=blocks, tile=tile, mpp_min=mpp_range[0], mpp_max=mpp_range[1],
        region=_region(region),
        batch_size=batch_size, epochs=epochs, steps_per_epoch=steps_per_epoch, lr=lr, warmup_steps=warmup_steps,
        temperature=temperature, dense_weight=dense_weight, dense_loss=dense_loss, val_fraction=val_fraction,
        hed_sigma=hed_sigma, blur_prob=blur_prob, border_prob=border_prob, rotate_augment=rotate_augment, seed=seed,
        save_dtype="float16" if half_weights else "float32",
    )
    # a bar of epochs and one of the current epoch's steps on a terminal; otherwise a line per epoch, one a minute
    bars = Progress(config.epochs, quiet=quiet, item="epoch", inner="steps", inner_unit="step")

    def on_step(info: StepInfo) -> None:
        per_epoch = max(1, info.total_steps // max(1, info.epochs))
        in_epoch = info.step - (info.epoch - 1) * per_epoch
        if in_epoch == 1 or bars.current is None:
            bars.start(info.epoch - 1, "")
        bars.units(in_epoch, per_epoch, "steps")
        if in_epoch >= per_epoch:
            bars.finish(info.epoch - 1, "", f"loss {info.loss:.4f}, lr {info.lr:.2e} at step {info.step}")

    with bars:
        result = run_pretrain([str(p) for p in inputs], out_dir, config, device=device, amp=amp, resume=resume,
                              backend=backend, mpp=mpp, stop_after_epoch=stop_after_epoch, threads=threads,
                              on_step=on_step)
    if quiet:
        return
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    if result.finished:
        click.echo(f"{result.weights}: {config.arch} model after {result.epochs_done} epochs in "
                   f"{result.seconds:.0f} s ({shown})")
    else:
        click.echo(f"{result.checkpoint}: stopped after epoch {result.epochs_done} of {config.epochs} ({shown}); "
                   "continue with --resume")
