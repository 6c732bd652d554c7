"""The network being trained: the backbone with its training-only heads, seeded so that a run is reproducible,
plus the input normalisation and the supervised validation."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from equiseg_wsi.models.resnet import ArchSpec, ResNetFeatures, build_model
from equiseg_wsi.models.sre_conv import set_forward_path
from equiseg_wsi.models.weights import DEFAULT_NORMALIZATION
from equiseg_wsi.training.config import PretrainConfig

__all__ = ["TrainingNet", "build_training_net", "evaluate", "predict_tiles", "to_tensor"]


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


def _init_head(head: nn.Module, seed: int) -> None:
    """Uniform ±1/sqrt(fan-in) weights and zero biases from a generator of their own, so a head's start does
    not depend on how many numbers the backbone's initialisation drew."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                bound = 1.0 / m.weight[0].numel() ** 0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound)
                if m.bias is not None:
                    m.bias.zero_()


def build_training_net(cfg: PretrainConfig, spec: ArchSpec, dev: torch.device) -> TrainingNet:
    """The seeded backbone of ``spec`` with the heads ``cfg`` asks for, on ``dev`` (before any checkpoint)."""
    torch.manual_seed(cfg.seed)
    backbone = build_model(spec, seed=cfg.seed)
    if cfg.arch == "sre":
        set_forward_path(backbone, cfg.forward_path)
    ssl = cfg.mode == "ssl"
    dense_head = ssl and cfg.dense_weight > 0 and cfg.dense_loss == "infonce"
    net = TrainingNet(backbone, cfg.proj_dim, ssl, dense=dense_head).to(dev)
    for head, offset in ((net.head, 1), (net.dense_head, 2)):
        if head is not None:
            _init_head(head, cfg.seed + offset)
            head.to(dev)
    return net


def to_tensor(batch: np.ndarray, device: torch.device) -> Tensor:
    """uint8 tiles (n, h, w, 3) -> normalised float (n, 3, h, w) on ``device``, as the weights file records."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(DEFAULT_NORMALIZATION["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(DEFAULT_NORMALIZATION["std"], device=device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_tiles(model: ResNetFeatures, tiles: np.ndarray, device: torch.device | str = "cpu",
                  batch_size: int = 32) -> np.ndarray:
    """Class predictions of a model with a head for uint8 tiles ``[N, H, W, 3]`` (eval mode, fp32)."""
    model = model.eval()
    dev = torch.device(device)
    out = []
    for s in range(0, len(tiles), batch_size):
        out.append(model(to_tensor(tiles[s : s + batch_size], dev)).argmax(1).cpu().numpy())
    return np.concatenate(out)


def evaluate(model: ResNetFeatures, tiles: np.ndarray, labels: np.ndarray, dev: torch.device) -> dict[str, float]:
    """Validation accuracy at 0/90/180/270° and the share of tiles predicted alike at all four turns."""
    was_training = model.training
    preds = [predict_tiles(model, np.ascontiguousarray(np.rot90(tiles, k, axes=(1, 2))), dev) for k in range(4)]
    model.train(was_training)
    row = {"val_acc": float(np.mean(preds[0] == labels))}
    for k in (1, 2, 3):
        row[f"val_acc_rot{90 * k}"] = float(np.mean(preds[k] == labels))
    row["val_rot_agreement"] = float(np.mean(np.all([p == preds[0] for p in preds], axis=0)))
    return row
