"""SRE-ResNet-18 as published and its standard-convolution twin.

Stride-1 stem, no max-pool, four stages of basic blocks; a stage that downsamples does it with 2x2 average
pooling *before* a stride-1 conv (strided convs would break rot90 equivariance), and its shortcut is
avg-pool -> 1x1 conv -> BN.  Module names follow the reference implementation so its state_dict loads
directly (``conv1``, ``bn1``, ``layerS.B.conv1[.1]``, ``layerS.B.conv2``, ``layerS.0.downsample.{1,2}``, ``fc``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arch import LAYER_NAMES, ArchSpec
from .sre_conv import SREConv2d

__all__ = ["LAYER_NAMES", "LAYER_STRIDES", "ArchSpec", "BasicBlock", "ResNetFeatures", "build_model"]

LAYER_STRIDES = ArchSpec().layer_strides()


def _conv(kind: str, cin: int, cout: int, k: int, generator: torch.Generator | None) -> nn.Module:
    if kind == "sre":
        return SREConv2d(cin, cout, k, bias=False, generator=generator)
    conv = nn.Conv2d(cin, cout, k, stride=1, padding=k // 2, bias=False)
    _kaiming(conv, generator)
    return conv


def _kaiming(conv: nn.Conv2d, generator: torch.Generator | None) -> None:
    """He-normal (fan_out, ReLU) as torchvision, drawn from our generator so seeds reproduce."""
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_out) ** 0.5)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``y * scale + shift``."""
    running_var, running_mean = bn.running_var, bn.running_mean
    if running_var is None or running_mean is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded into a convolution")
    scale = torch.rsqrt(running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _can_fuse(block: nn.Module) -> bool:
    """Folding BN is exact only with running statistics, and is meant for inference (no autograd)."""
    if block.training or torch.is_grad_enabled():
        return False
    return all(not m.training and m.running_var is not None
               for m in block.modules() if isinstance(m, nn.BatchNorm2d))


def _same_pool(a: nn.Module, b: nn.Module) -> bool:
    return isinstance(a, nn.AvgPool2d) and isinstance(b, nn.AvgPool2d) and repr(a) == repr(b)


def _conv_bn(conv: nn.Module, bn: nn.BatchNorm2d, x: Tensor, residual: Tensor | None = None,
             relu: bool = False) -> Tensor:
    """``relu(bn(conv(x)) + residual)`` with BN folded into the conv weights (inference only)."""
    scale, shift = _bn_affine(bn)
    if isinstance(conv, SREConv2d):
        return conv.forward_fused(x, scale, shift, residual=residual, relu=relu)
    if isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros":
        w = conv.weight * scale.to(conv.weight.dtype)[:, None, None, None]
        b = shift if conv.bias is None else conv.bias * scale + shift
        y = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    else:
        y = bn(conv(x))
    if residual is not None:
        y = y.add_(residual)
    return y.relu_() if relu else y


class BasicBlock(nn.Module):
    """Two K x K convs with BN/ReLU and a residual; downsampling is avg-pool first, never a strided conv."""

    def __init__(self, kind: str, inplanes: int, planes: int, k: int, stride: int,
                 generator: torch.Generator | None) -> None:
        super().__init__()
        conv1 = _conv(kind, inplanes, planes, k, generator)
        self.conv1: nn.Module = nn.Sequential(nn.AvgPool2d(stride, stride), conv1) if stride != 1 else conv1
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(kind, planes, planes, k, generator)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes:
            sc = nn.Conv2d(inplanes, planes, 1, bias=False)
            _kaiming(sc, generator)
            self.downsample = nn.Sequential(nn.AvgPool2d(stride, stride), sc, nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        if _can_fuse(self):
            return self._forward_fused(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        y: Tensor = self.relu(out + identity)
        return y

    def _forward_fused(self, x: Tensor) -> Tensor:
        """Inference: BN folded into the convs, one shared avg-pool, fused residual + ReLU (same result)."""
        conv1 = self.conv1[-1] if isinstance(self.conv1, nn.Sequential) else self.conv1
        xp = self.conv1[0](x) if isinstance(self.conv1, nn.Sequential) else x
        out = _conv_bn(conv1, self.bn1, xp, relu=True)
        if self.downsample is None:
            identity = x
        else:
            pool, sc, bn = self.downsample
            if not isinstance(bn, nn.BatchNorm2d):
                raise TypeError(f"the shortcut must end in a BatchNorm2d, got {type(bn).__name__}")
            same_pool = isinstance(self.conv1, nn.Sequential) and _same_pool(pool, self.conv1[0])
            identity = _conv_bn(sc, bn, xp if same_pool else pool(x))
        return _conv_bn(self.conv2, self.bn2, out, residual=identity, relu=True)


class ResNetFeatures(nn.Module):
    """SRE-ResNet (or its standard twin) that returns intermediate maps by name.

    ``forward(x)`` gives logits when the spec has a head; feature extraction uses :meth:`features`.
    """

    def __init__(self, spec: ArchSpec, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.spec = spec
        w0 = spec.widths[0]
        self.conv1 = _conv(spec.kind, spec.in_channels, w0, spec.stem_kernel, generator)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        inplanes = w0
        stages = zip(spec.widths, spec.kernel_sizes, spec.blocks, spec.strides, strict=True)
        for i, (planes, k, n, s) in enumerate(stages):
            blocks = [BasicBlock(spec.kind, inplanes, planes, k, s, generator)]
            blocks += [BasicBlock(spec.kind, planes, planes, k, 1, generator) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.fc: nn.Linear | None = None
        if spec.num_classes > 0:
            self.fc = nn.Linear(inplanes, spec.num_classes)

    @property
    def stage_names(self) -> list[str]:
        return [f"layer{i + 1}" for i in range(len(self.spec.widths))]

    def features(self, x: Tensor, layers: tuple[str, ...] | list[str] = ("layer4",)) -> dict[str, Tensor]:
        """Maps of the requested layers ("stem", "layer1", ...); stops after the deepest one requested."""
        valid = ["stem", *self.stage_names]
        for name in layers:
            if name not in valid:
                raise ValueError(f"unknown layer {name!r}; choose from {valid}")
        last = max(valid.index(n) for n in layers)
        out: dict[str, Tensor] = {}
        if _can_fuse(self):
            x = _conv_bn(self.conv1, self.bn1, x, relu=True)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        if "stem" in layers:
            out["stem"] = x
        for name in valid[1 : last + 1]:
            x = getattr(self, name)(x)
            if name in layers:
                out[name] = x
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x, (self.stage_names[-1],))[self.stage_names[-1]]
        if self.fc is None:
            return x
        logits: Tensor = self.fc(torch.flatten(x.mean(dim=(2, 3), keepdim=True), 1))
        return logits


def build_model(spec: ArchSpec, seed: int | None = None) -> ResNetFeatures:
    """Build the network of ``spec``; with ``seed`` the random initialisation is reproducible."""
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    model = ResNetFeatures(spec, generator=gen)
    if model.fc is not None and gen is not None:
        with torch.no_grad():
            bound = 1.0 / model.fc.in_features ** 0.5
            model.fc.weight.copy_((torch.rand(model.fc.weight.shape, generator=gen) * 2 - 1) * bound)
            model.fc.bias.zero_()
    return model
