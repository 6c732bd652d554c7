"""Compiled CPU ring path of the SRE convolution: ring sums in one cache-resident pass, then one GEMM.

The ring path factorises an SRE conv as ``Y_o = sum_(i,r) w[o,i,r] * (Mask_r * X_i)``.  Done with PyTorch ops, the
ring sums are a depthwise K x K convolution that writes b maps per channel to memory and runs far below the
CPU's peak; here a small numba kernel computes them for a strip of rows in channels-last layout using the
rings' mirror symmetry (every mask is symmetric in x and y, so each quarter offset ``(k, j)`` stands for the
four pixels ``(+-k, +-j)``: one vertical pair sum per row offset, one horizontal pair sum per ring pixel), and
the strip goes straight into the mixing GEMM (oneDNN, inner dimension ``C_in * b``) while it is in cache.
Cost per output pixel: about ``C_in * (K//2 + 2 * pairs)`` additions (22 quarter pairs for K = 9, 8 for K = 5) plus
``C_in * b * C_out`` MACs; no FFTs.

Rows are split into one contiguous chunk per thread, each thread running the nogil kernel and single-threaded
GEMMs (two thread hand-offs per call).  Inference only: no autograd, CPU tensors, ``groups == 1``.
Exact up to float rounding (about 1e-6 relative to the dense convolution).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .rings import ring_masks
from .workers import run_parts

__all__ = ["available", "ring_conv"]

_PIXELS_PER_STRIP = 1024  # rows per strip = this // width; 256-2048 measured within 10% of each other (2 cores)


@lru_cache(maxsize=1)
def _compiled() -> Any:
    """The numba kernel, compiled on first use (cached on disk by numba); None when numba is missing."""
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - numba is a dependency; the FFT path remains without it
        return None

    @njit(nogil=True, boundscheck=False, cache=True)
    def ring_sums(  # pragma: no cover - compiled, tested through ring_conv
        x: np.ndarray, y0: int, y1: int, c: int, pairs: np.ndarray, out: np.ndarray, v: np.ndarray
    ) -> None:
        # x: (H, W, C) channels-last image; rows y0:y1 -> out[(y - y0) * W + x, r, i].
        # v: (c + 1, W + 2c, C) scratch whose c columns at each end stay zero (the conv's zero padding).
        h, w, cn = x.shape
        npairs = pairs.shape[0]
        for y in range(y0, y1):
            for xx in range(w):
                for i in range(cn):
                    v[0, xx + c, i] = x[y, xx, i]
            for k in range(1, c + 1):  # v[k] = row y-k + row y+k (zero outside the image)
                up = y - k
                dn = y + k
                if up >= 0 and dn < h:
                    for xx in range(w):
                        for i in range(cn):
                            v[k, xx + c, i] = x[up, xx, i] + x[dn, xx, i]
                elif up >= 0:
                    for xx in range(w):
                        for i in range(cn):
                            v[k, xx + c, i] = x[up, xx, i]
                elif dn < h:
                    for xx in range(w):
                        for i in range(cn):
                            v[k, xx + c, i] = x[dn, xx, i]
                else:
                    for xx in range(w):
                        for i in range(cn):
                            v[k, xx + c, i] = 0.0
            base = (y - y0) * w
            for xo in range(w):
                p = base + xo
                xc = xo + c
                prev = -1
                for t in range(npairs):  # pairs sorted by ring: the first pair of a ring assigns
                    r = pairs[t, 0]
                    k = pairs[t, 1]
                    j = pairs[t, 2]
                    if r != prev:
                        prev = r
                        if j == 0:
                            for i in range(cn):
                                out[p, r, i] = v[k, xc, i]
                        else:
                            for i in range(cn):
                                out[p, r, i] = v[k, xc + j, i] + v[k, xc - j, i]
                    elif j == 0:
                        for i in range(cn):
                            out[p, r, i] += v[k, xc, i]
                    else:
                        for i in range(cn):
                            out[p, r, i] += v[k, xc + j, i] + v[k, xc - j, i]

    return ring_sums


def available() -> bool:
    """True when the compiled kernel can run (numba importable)."""
    return _compiled() is not None


@lru_cache(maxsize=32)
def _quarter_pairs(kernel_size: int) -> np.ndarray:
    """(ring, |dy|, |dx|) for every ring pixel with dy, dx >= 0, grouped by ring: shape (n_pairs, 3)."""
    masks = ring_masks(kernel_size).numpy()
    c = kernel_size // 2
    pairs = [(r, k, j) for r in range(masks.shape[0]) for k in range(c + 1) for j in range(c + 1)
             if masks[r, c + k, c + j] > 0]
    return np.ascontiguousarray(np.array(pairs, dtype=np.int64))


def ring_conv(
    x: Tensor, weight: Tensor, kernel_size: int, bias: Tensor | None = None,
    residual: Tensor | None = None, relu: bool = False, scale: Tensor | None = None,
) -> Tensor:
    """``relu(sre_conv(x; weight * scale) + bias + residual)`` on CPU, float32, in channels-last memory format.

    ``weight`` has the SRE layout (out, in, b); ``scale`` (per output channel) is a folded BatchNorm, applied
    while the weights are reordered for the GEMM.  ``x`` and ``residual`` may be in either memory format.
    """
    kernel = _compiled()
    if kernel is None:  # pragma: no cover
        raise RuntimeError("the compiled ring kernel needs numba")
    bsz, cin, h, w = x.shape
    cout, _, b = weight.shape
    c = kernel_size // 2
    pairs = _quarter_pairs(kernel_size)
    xnp = x.detach().float().permute(0, 2, 3, 1).contiguous().numpy()  # no copy when x is channels-last already
    # columns ordered (r, i) like the kernel's output rows; a batch-16 1x1 conv sends the GEMM to oneDNN
    w4 = torch.empty(cout, b, cin, dtype=torch.float32)
    wt = weight.detach().float().permute(0, 2, 1)
    if scale is None:
        w4.copy_(wt)
    else:
        torch.mul(wt, scale.detach().float()[:, None, None], out=w4)
    w4 = w4.view(cout, b * cin, 1, 1)
    bias_f = None if bias is None else bias.detach().float().contiguous()
    res = None if residual is None else residual.detach().float().permute(0, 2, 3, 1).contiguous()
    out = torch.empty(bsz, h, w, cout, dtype=torch.float32)
    rows = max(1, _PIXELS_PER_STRIP // w)
    nthreads = max(1, min(torch.get_num_threads(), h // rows))
    bounds = [h * k // nthreads for k in range(nthreads + 1)]

    def work(part: int) -> None:
        y_lo, y_hi = bounds[part], bounds[part + 1]
        m_pad = -(-rows * w // 16) * 16
        buf = torch.zeros(m_pad, b, cin, dtype=torch.float32)
        bnp = buf.numpy()
        scratch = np.zeros((c + 1, w + 2 * c, cin), dtype=np.float32)
        with torch.inference_mode():
            for n in range(bsz):
                for y0 in range(y_lo, y_hi, rows):
                    y1 = min(y_hi, y0 + rows)
                    m = (y1 - y0) * w
                    kernel(xnp[n], y0, y1, c, pairs, bnp, scratch)
                    a4 = buf.view(16, 1, m_pad // 16, b * cin).permute(0, 3, 1, 2)
                    y = F.conv2d(a4, w4, bias_f).permute(0, 2, 3, 1).reshape(m_pad, cout)[:m]
                    dest = out[n, y0:y1].view(m, cout)
                    if res is not None:
                        torch.add(y, res[n, y0:y1].view(m, cout), out=dest)
                    else:
                        dest.copy_(y)
                    if relu:
                        dest.relu_()

    run_parts(work, nthreads)
    return out.permute(0, 3, 1, 2)
