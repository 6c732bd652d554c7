"""The fixed geometry of an SRE kernel: b = K//2 + 1 concentric rings of a K x K window.

Kept apart from the layer so that the compiled ring kernel and the layer share one definition of the rings
without importing each other.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["num_rings", "ring_masks"]


def num_rings(kernel_size: int) -> int:
    """Number of ring weights of a K x K SRE kernel (b = K//2 + 1)."""
    return kernel_size // 2 + 1


@lru_cache(maxsize=32)
def _ring_masks_cached(kernel_size: int) -> Tensor:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"SRE kernel size must be odd and positive, got {kernel_size}")
    c = kernel_size // 2
    b = num_rings(kernel_size)
    ax = torch.arange(kernel_size, dtype=torch.float64) - c
    dist = torch.sqrt(ax[:, None] ** 2 + ax[None, :] ** 2)
    edges = torch.linspace(0.0, c + 0.5, b + 1, dtype=torch.float64)
    masks = [((dist >= edges[r]) & (dist < edges[r + 1])) for r in range(b)]
    return torch.stack(masks).to(torch.float32)


def ring_masks(kernel_size: int) -> Tensor:
    """Fixed binary ring masks, shape (b, K, K); pixels at distance >= K//2 + 0.5 (corners) belong to none."""
    return _ring_masks_cached(kernel_size).clone()
