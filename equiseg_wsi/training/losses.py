"""The training losses: SimCLR's pooled NT-Xent and the optional dense (per-cell) terms.

The dense terms match cells by slide position: each view's box on the slide is known, so every ``layer4`` cell
of view A has an exact partner location in view B (other shift, other µm/px), where B's cell map is read
bilinearly (:func:`cell_grid`, then ``grid_sample``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from equiseg_wsi.training.config import PretrainConfig

__all__ = ["cell_grid", "dense_cosine", "dense_nt_xent", "dense_term", "nt_xent"]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's normalised-temperature cross entropy: each view must pick its partner among 2n - 1."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def cell_grid(src: np.ndarray, dst: np.ndarray, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Where each cell centre of view ``src`` lies in view ``dst``, as a ``grid_sample`` grid.

    src, dst: (n, 3) level-0 boxes (x, y, side) of square views; size: the (h, w) cell map of both views.
    Returns the grid (n, h, w, 2) in dst's normalised coordinates (align_corners=False: -1 and 1 are the
    outer edges of the view) and a mask (n, h, w), True where that location lies inside dst.
    """
    h, w = size
    src_t = torch.as_tensor(src, dtype=torch.float64)
    dst_t = torch.as_tensor(dst, dtype=torch.float64)
    gy = (torch.arange(h, dtype=torch.float64) + 0.5) / h  # cell centres as a fraction of the view side
    gx = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    px = src_t[:, 0, None] + gx[None] * src_t[:, 2, None]  # (n, w) level-0 x of src's cell centres
    py = src_t[:, 1, None] + gy[None] * src_t[:, 2, None]
    u = 2.0 * (px - dst_t[:, 0, None]) / dst_t[:, 2, None] - 1.0
    v = 2.0 * (py - dst_t[:, 1, None]) / dst_t[:, 2, None] - 1.0
    shape = (src_t.shape[0], h, w)
    grid = torch.stack([u[:, None, :].expand(shape), v[:, :, None].expand(shape)], dim=-1)
    inside = (grid.abs() <= 1.0).all(dim=-1)
    return grid.float(), inside


def dense_nt_xent(qa: Tensor, kb: Tensor, grid: Tensor, inside: Tensor, temperature: float) -> Tensor:
    """Cell-level InfoNCE from view A to view B.

    qa, kb: projected cell maps (n, c, h, w) of views A and B; grid/inside: :func:`cell_grid` of A in B.
    Each cell of A whose location lies inside B must pick B's feature resampled at that location among the
    resampled features of the other spots' cells; cells of its own spot are masked out, neither positive nor
    negative, so that neighbouring tissue of one spot is not pushed apart.
    """
    n, c, h, w = qa.shape
    kb_at_a = _resample(kb, grid)
    q = F.normalize(qa.float().permute(0, 2, 3, 1).reshape(n * h * w, c), dim=1)
    k = F.normalize(kb_at_a.permute(0, 2, 3, 1).reshape(n * h * w, c), dim=1)
    valid = inside.reshape(-1).to(q.device)
    q, k = q[valid], k[valid]
    spot = torch.arange(n, device=q.device).repeat_interleave(h * w)[valid]
    sim = q @ k.t() / temperature
    same = spot[:, None] == spot[None, :]
    sim = sim.masked_fill(same & ~torch.eye(len(spot), dtype=torch.bool, device=q.device), float("-inf"))
    return F.cross_entropy(sim, torch.arange(len(spot), device=q.device))


def dense_cosine(fa: Tensor, fb: Tensor, grid: Tensor, inside: Tensor) -> Tensor:
    """1 - mean cosine between each cell of view A and view B's map resampled at the same place (cells whose
    place lies inside B only); fa, fb: (n, c, h, w); grid/inside: :func:`cell_grid` of A in B."""
    cos = F.cosine_similarity(fa.float(), _resample(fb, grid), dim=1)  # (n, h, w)
    return 1.0 - cos[inside.to(cos.device)].mean()


def _resample(fmap: Tensor, grid: Tensor) -> Tensor:
    """``fmap`` (n, c, h, w) read bilinearly at the :func:`cell_grid` locations."""
    return F.grid_sample(fmap.float(), grid.to(fmap.device), mode="bilinear", padding_mode="border",
                         align_corners=False)


def dense_term(zmap: Tensor, boxes: np.ndarray, cfg: PretrainConfig) -> Tensor:
    """The configured dense loss, symmetric in the two views; zmap stacks views A then B, boxes is (2, n, 3)."""
    n = zmap.shape[0] // 2
    size = (zmap.shape[2], zmap.shape[3])
    total = zmap.new_zeros(())
    for (fa, fb), (src, dst) in (((zmap[:n], zmap[n:]), (boxes[0], boxes[1])),
                                 ((zmap[n:], zmap[:n]), (boxes[1], boxes[0]))):
        grid, inside = cell_grid(src, dst, size)
        if cfg.dense_loss == "cosine":
            total = total + dense_cosine(fa, fb, grid, inside)
        else:
            total = total + dense_nt_xent(fa, fb, grid, inside, cfg.temperature)
    return 0.5 * total
