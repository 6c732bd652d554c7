"""What a run leaves besides its checkpoint: the trained model in the project weights format, the per-step and
per-epoch logs as CSV, and a plot of the loss; every file is written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from equiseg_wsi.export.atomic import atomic_path
from equiseg_wsi.export.table import write_table
from equiseg_wsi.models.resnet import ArchSpec, ResNetFeatures
from equiseg_wsi.models.weights import DEFAULT_NORMALIZATION, save_weights
from equiseg_wsi.training.config import PretrainConfig

__all__ = ["method", "plot_losses", "save_model", "write_logs"]


def method(cfg: PretrainConfig) -> str:
    """The training objective in words, for the model's provenance."""
    if cfg.mode != "ssl":
        return "supervised cross-entropy"
    if cfg.dense_weight > 0:
        term = "cosine consistency of matched layer4 cells" if cfg.dense_loss == "cosine" else "cell-level InfoNCE"
        return f"SimCLR NT-Xent on pooled layer4 features + {cfg.dense_weight:g} x dense {term}"
    return "SimCLR NT-Xent on pooled layer4 features"


def save_model(path: Path, backbone: ResNetFeatures, spec: ArchSpec, cfg: PretrainConfig, data: dict[str, Any],
               metrics: dict[str, float], seconds: float, classes: list[str], dev: torch.device,
               use_amp: bool) -> None:
    """Write the backbone with everything needed to judge and reproduce it (options, data, final metrics)."""
    from equiseg_wsi import __version__

    if cfg.save_dtype == "float16":
        backbone = backbone.half()
    provenance = {
        "created_by": f"equiseg pretrain (equiseg-wsi {__version__})",
        "method": method(cfg),
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


def write_logs(log_csv: Path, epochs_csv: Path, log_rows: list[dict[str, Any]],
               epoch_rows: list[dict[str, Any]]) -> None:
    """Both logs, every column that any row has (a dense loss column appears only when the term is on)."""
    write_table(log_csv, log_rows)
    write_table(epochs_csv, epoch_rows)


def plot_losses(path: Path, log_rows: list[dict[str, Any]], epoch_rows: list[dict[str, Any]]) -> Path:
    """Loss per step and its mean per epoch (plotted at each epoch's last step) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log_rows]
    loss = [r["loss"] for r in log_rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.6, label="loss per step")
    ends = {r["epoch"]: r["step"] for r in log_rows}
    ax.plot([ends[r["epoch"]] for r in epoch_rows], [r["mean_loss"] for r in epoch_rows], "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path
