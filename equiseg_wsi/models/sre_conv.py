"""SRE convolution: isotropic K x K kernels with one learnable weight per ring.

Each kernel is ``W[o, i] = sum_r w[o, i, r] * Mask_r``; the masks are fixed rings around the centre, so the
layer is exactly equivariant to 90 degree rotations and flips (and close to it at any angle).  The
weight tensor has shape ``(out, in / groups, b)`` with ``b = K // 2 + 1`` like the reference ``conv1.weight``.

Three numerically equivalent forward paths (all use the *current* weights on every call, so weights loaded
at any time are used -- no cached kernel that can go stale):

* ``"dense"``: build the dense kernel from the rings, then one ordinary convolution (C_in*C_out*K^2 MACs/px).
* ``"ring"``: depthwise convolution of each input channel with the b fixed ring masks, then a 1x1 mixing
  convolution (C_in*b*K^2 + C_in*b*C_out MACs/px).  For CPU inference it runs as a compiled kernel
  (:mod:`.ring_kernel`: ring sums from the masks' mirror symmetry, strip by strip, straight into one oneDNN
  GEMM, with bias, residual and ReLU applied in cache; output channels-last); otherwise as PyTorch ops.
* ``"fft"``: the same ring factorisation done in the frequency domain: rfft2 each input channel once
  (scipy's pocketfft, sizes with factors 2, 3, 5, 7 only), scale each spectrum by the real spectra of the
  b rings, mix with one GEMM of inner dimension C_in*b per cache-sized frequency block (run by oneDNN, one
  chunk of frequencies per thread), inverse FFT.  Costs b*C_in*C_out MACs/px plus 2 FFTs per channel;
  exact up to float rounding (about 1e-6 relative).

:meth:`SREConv2d.forward_fused` additionally folds an eval-mode BatchNorm, a residual add and a ReLU into the
convolution (used by the SRE-ResNet at inference).

``"auto"`` picks per device and shape with a rule measured on CPU (see :func:`choose_path`).  Outputs may be
channels-last tensors; every path accepts either memory format.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rings import num_rings, ring_masks
from .workers import run_parts

try:  # scipy is a project dependency; its pocketfft is faster than torch.fft on CPU
    import scipy.fft as _scipy_fft

    _HAVE_SCIPY_FFT = True
except ImportError:  # pragma: no cover - fall back to torch.fft
    _HAVE_SCIPY_FFT = False

__all__ = ["FORWARD_PATHS", "SREConv2d", "choose_path", "ring_masks", "num_rings", "set_forward_path"]

FORWARD_PATHS = ("auto", "dense", "ring", "fft")


def choose_path(
    device: torch.device, in_channels: int, out_channels: int, kernel_size: int, height: int, width: int,
    groups: int = 1, compiled_ring: bool = False,
) -> str:
    """Pick the fastest exact forward path for this device and shape.

    Rule from measurements on a 2-core AVX-512 CPU (benchmarks/bench_sre.py): for inference the compiled ring
    kernel (``compiled_ring``: numba available, no autograd) beats the FFT path and oneDNN's dense convolution
    for every SRE layer of the SRE-ResNet-18, the 3-channel stem included.  Without it, the FFT path (mixing
    as one oneDNN GEMM of inner dimension C_in * b) beats dense 1.4-3.5x for K >= 5 once maps are >= 32 x 32
    with >= 64 channels (or >= 64 x 64 with >= 32 channels); dense wins for the stem, small maps and few
    channels, and for training.  On GPUs cuDNN's dense convolution is used.
    """
    if device.type != "cpu" or groups != 1 or kernel_size < 3:
        return "dense"
    if compiled_ring:
        return "ring"
    if kernel_size < 5:
        return "dense"
    side, chans = min(height, width), min(in_channels, out_channels)
    if (side >= 32 and chans >= 64) or (side >= 64 and chans >= 32):
        return "fft"
    return "dense"


def _good_fft_size(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3, 5 and 7 (fast for pocketfft/MKL; 13, 43, ... are not)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _use_scipy_fft(x: Tensor) -> bool:
    """scipy's pocketfft with workers measured 2-4x faster than torch.fft on CPU; only without autograd."""
    return (_HAVE_SCIPY_FFT and x.device.type == "cpu" and x.dtype in (torch.float32, torch.complex64)
            and not (torch.is_grad_enabled() and x.requires_grad))


def _rfft2(x: Tensor, n_h: int, n_w: int) -> Tensor:
    """rfft2 of the zero-padded (n_h, n_w) input: complex (..., n_h, n_w // 2 + 1)."""
    if _use_scipy_fft(x):
        workers = max(1, torch.get_num_threads())
        return torch.from_numpy(_scipy_fft.rfft2(x.detach().numpy(), s=(n_h, n_w), workers=workers))
    spectrum: Tensor = torch.fft.rfft2(x, s=(n_h, n_w))
    return spectrum


def _irfft2_crop(y: Tensor, n_h: int, n_w: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_rfft2` cropped to (h, w); rows beyond h are dropped before the last 1-D pass."""
    if _use_scipy_fft(y):
        workers = max(1, torch.get_num_threads())
        z = _scipy_fft.ifft(y.numpy(), axis=-2, workers=workers, overwrite_x=True)[..., :h, :]
        return torch.from_numpy(_scipy_fft.irfft(z, n=n_w, axis=-1, workers=workers, overwrite_x=True))[..., :w]
    image: Tensor = torch.fft.irfft2(y, s=(n_h, n_w))
    return image[..., :h, :w]


def _is_dense_layout(y: Tensor) -> bool:
    return y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)


def _compiled_ring_applies(x: Tensor, weight: Tensor, groups: int) -> bool:
    """The compiled ring kernel serves CPU inference with groups == 1 (training keeps differentiable paths)."""
    if x.device.type != "cpu" or groups != 1 or x.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    from . import ring_kernel

    return ring_kernel.available()


class SREConv2d(nn.Module):
    """Symmetric rotation-equivariant 2-D convolution, stride 1, zero padding K//2.

    ``path`` forces a forward path ("dense", "ring", "fft") or leaves the choice to ``"auto"``.
    Strides are deliberately unsupported (they break the rotation equivariance): downsample with average
    pooling before the conv.
    """

    masks: Tensor  # registered buffer: the fixed ring masks (b, K, K)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = False,
        groups: int = 1,
        path: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError("in_channels and out_channels must be divisible by groups")
        if path not in FORWARD_PATHS:
            raise ValueError(f"path must be one of {FORWARD_PATHS}, got {path!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = int(kernel_size)
        self.groups = groups
        self.padding = self.kernel_size // 2
        self.path = path
        b = num_rings(self.kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, b))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # Fixed geometry, not learnable and not saved: a checkpoint carries only the ring weights.
        self.register_buffer("masks", ring_masks(self.kernel_size), persistent=False)
        self._mask_spectra: dict[tuple[int | str, ...], Tensor] = {}
        self.reset_parameters(generator)

    @property
    def num_rings(self) -> int:
        return self.weight.shape[-1]

    def ring_sizes(self) -> Tensor:
        """Pixels covered by each ring (what each ring weight multiplies)."""
        return self.masks.sum(dim=(1, 2))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He-normal initialisation in which each ring weight is scaled by the pixels it touches.

        A ring weight multiplies n_r pixels; on smooth images those pixels are strongly correlated, so the
        ring's contribution grows like n_r, not sqrt(n_r).  Dividing the std by n_r and sharing the variance
        budget over the b rings and the fan-in keeps activations of order one through a deep network
        (the reference's per-pixel initialisation reaches ~1e7 at layer4 on real H&E).
        """
        fan_in = self.weight.shape[1] * self.num_rings
        n = self.ring_sizes().clamp(min=1.0)
        std = math.sqrt(2.0 / fan_in) / n
        with torch.no_grad():
            w = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32)
            self.weight.copy_(w * std.to(w.dtype))
            if self.bias is not None:
                self.bias.zero_()

    def dense_kernel(self) -> Tensor:
        """The K x K kernel built from the current ring weights, shape (out, in/groups, K, K)."""
        return torch.einsum("oir,rkl->oikl", self.weight, self.masks.to(self.weight.dtype))

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rings={self.num_rings}"
             f", path={self.path!r}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s

    def resolved_path(self, x: Tensor, compiled_ring: bool = False) -> str:
        """The path this call runs; ``compiled_ring``: the compiled ring kernel can serve it."""
        if self.path != "auto":
            if self.path == "fft" and self.groups != 1:
                return "ring"
            return self.path
        return choose_path(x.device, self.in_channels, self.out_channels, self.kernel_size,
                           x.shape[-2], x.shape[-1], self.groups, compiled_ring=compiled_ring)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, self.weight, self.bias)

    def forward_fused(
        self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None,
        residual: Tensor | None = None, relu: bool = False,
    ) -> Tensor:
        """``relu(conv(x) * scale + shift + residual)`` with eval-mode BatchNorm folded into the conv.

        The per-channel scale goes into the ring weights and the shift into the bias, and the residual add and
        ReLU run on the conv's output while it is still in cache (the compiled ring path) or in one pass:
        on a 2-core CPU separate BN / add / ReLU / copy passes cost as much as the convolutions.
        Equal to the unfused modules up to float rounding; uses the current weights on every call.
        """
        bias: Tensor | None = self.bias
        if scale is not None and bias is not None:
            bias = bias * scale.to(bias.dtype)
        if shift is not None:
            bias = shift if bias is None else bias + shift
        return self._run(x, self.weight, bias, residual, relu, scale)

    def _run(self, x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None,
             relu: bool = False, scale: Tensor | None = None) -> Tensor:
        """``relu(conv(x; weight * scale) + bias + residual)`` by the resolved path."""
        compiled = _compiled_ring_applies(x, weight, self.groups)
        path = self.resolved_path(x, compiled)
        if path == "ring" and compiled:
            from . import ring_kernel

            return ring_kernel.ring_conv(x, weight, self.kernel_size, bias, residual, relu, scale)
        if scale is not None:
            weight = weight * scale.to(weight.dtype)[:, None, None]
        if path == "dense":
            y = self._forward_dense(x, weight, bias)
        elif path == "ring":
            y = self._forward_ring(x, weight, bias)
        else:
            y = self._forward_fft(x, weight, bias)  # may be a strided crop
        if residual is not None:
            y = torch.add(y, residual)
            return y.relu_() if relu else y
        y = torch.relu(y) if relu else y
        return y if _is_dense_layout(y) else y.contiguous()

    # -- forward paths ------------------------------------------------------------------------------------
    def _forward_dense(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        weight = self.weight if weight is None else weight
        w = torch.einsum("oir,rkl->oikl", weight, self.masks.to(weight.dtype)).to(dtype=x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        return F.conv2d(x, w, bias, padding=self.padding, groups=self.groups)

    def _forward_ring(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        weight = self.weight if weight is None else weight
        b = self.num_rings
        masks = self.masks.to(dtype=x.dtype)
        # depthwise: every input channel against the b fixed masks -> channels ordered (i, r)
        dw = masks[:, None].repeat(self.in_channels, 1, 1, 1)
        z = F.conv2d(x, dw, None, padding=self.padding, groups=self.in_channels)
        mix = weight.reshape(self.out_channels, (self.in_channels // self.groups) * b, 1, 1)
        bias = None if bias is None else bias.to(x.dtype)
        return F.conv2d(z, mix.to(x.dtype), bias, groups=self.groups)

    def _mask_spectrum(self, n_h: int, n_w: int, device: torch.device) -> Tensor:
        """Real spectrum of each ring mask centred at the origin, shape (b, n_h * (n_w//2+1)).

        The masks are point-symmetric, so their spectra are real.  Cached per size: they depend only on
        the fixed geometry, never on the learnable weights.
        """
        key = (n_h, n_w, str(device))
        spec = self._mask_spectra.get(key)
        if spec is None:
            c = self.padding
            m = self.masks.to(device=device, dtype=torch.float64)
            padded = F.pad(m, (0, n_w - self.kernel_size, 0, n_h - self.kernel_size))
            padded = torch.roll(padded, shifts=(-c, -c), dims=(1, 2))
            spec = torch.fft.rfft2(padded).real.to(torch.float32).reshape(self.num_rings, -1).contiguous()
            self._mask_spectra[key] = spec
        return spec

    def _mask_spectrum_interleaved(self, n_h: int, n_w: int, device: torch.device) -> Tensor:
        """:meth:`_mask_spectrum` with every value repeated for (real, imag): shape (b, 2 * n_freq)."""
        key = ("interleaved", n_h, n_w, str(device))
        spec2 = self._mask_spectra.get(key)
        if spec2 is None:
            spec = self._mask_spectrum(n_h, n_w, device)
            spec2 = spec[:, :, None].expand(-1, -1, 2).reshape(spec.shape[0], -1).contiguous()
            self._mask_spectra[key] = spec2
        return spec2

    def _forward_fft(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                     block_floats: int = 1 << 19) -> Tensor:
        """FFT path; returns the (h, w) crop of the inverse transform, possibly a strided view."""
        weight = self.weight if weight is None else weight
        if self.groups != 1:
            return self._forward_ring(x, weight, bias)
        orig_dtype = x.dtype
        x = x.float().contiguous()
        bsz, cin, h, w = x.shape
        c = self.padding
        n_h, n_w = _good_fft_size(h + c), _good_fft_size(w + c)  # >= H + K//2: no wrap-around
        nf = n_h * (n_w // 2 + 1)
        b, cout = self.num_rings, self.out_channels
        xf = torch.view_as_real(_rfft2(x, n_h, n_w)).reshape(bsz, cin, nf * 2)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            # differentiable (training) variant: same maths, no in-place blocks
            spec = self._mask_spectrum(n_h, n_w, x.device)
            wmat = weight.float().permute(2, 0, 1).reshape(b * cout, cin)
            z = torch.matmul(wmat, xf).view(bsz, b, cout, nf, 2)
            yf = (z * spec[None, :, None, :, None]).sum(dim=1)
            if bias is not None:
                y = _irfft2_crop(torch.view_as_complex(yf.contiguous()), n_h, n_w, h, w)
                return (y + bias.float()[None, :, None, None]).to(orig_dtype)
        else:
            spec2 = self._mask_spectrum_interleaved(n_h, n_w, x.device)
            yf = self._fft_mix_blocked(xf, weight.detach().float(), spec2, block_floats)
            if bias is not None:  # a constant over the whole (n_h, n_w) output is n_h*n_w at DC (real part)
                yf[:, :, 0] += bias.detach().float() * float(n_h * n_w)
        yc = torch.view_as_complex(yf.view(bsz, cout, n_h, n_w // 2 + 1, 2))
        return _irfft2_crop(yc, n_h, n_w, h, w).to(orig_dtype)

    def _fft_mix_blocked(self, xf: Tensor, weight: Tensor, spec2: Tensor, block_floats: int) -> Tensor:
        """Y_o = sum_(i,r) w[o,i,r] * (S_r X_i), one cache-sized block of frequencies at a time.

        Scaling the input spectra by the ring spectra first turns the mixing into one GEMM with inner
        dimension C_in * b (the weight tensor's own (o, i, r) layout), which runs far closer to peak than
        b GEMMs of inner dimension C_in followed by b memory-bound multiply-adds.  The frequency range is
        split into one contiguous chunk per thread, each running single-threaded GEMMs: two thread
        hand-offs per call instead of two per block (measured 2-4x faster on a 2-core CPU, most of all when
        other processes compete for the cores).
        """
        bsz, cin, n2 = xf.shape
        b, cout = self.num_rings, self.out_channels
        ck = cin * b
        # The GEMM runs as a 1x1 convolution over a batch of 16 frequency chunks: that is what sends it to
        # oneDNN's kernels (PyTorch gives torch.mm, and 1x1 convs with batch < 16 on one thread, to the
        # BLAS), measured 1.3-2x faster than torch.mm on an AVX-512 AMD CPU, whose MKL runs a slower path.
        w4 = weight.reshape(cout, ck, 1, 1).contiguous()
        wmat = w4.view(cout, ck)
        yf = torch.empty(bsz, cout, n2, device=xf.device, dtype=torch.float32)
        blk = max(1024, min(8192, block_floats // ck)) // 16 * 16
        nthreads = max(1, min(torch.get_num_threads(), n2 // blk))
        bounds = [n2 * k // nthreads // 16 * 16 for k in range(nthreads)] + [n2]

        def work(k: int) -> None:
            with torch.inference_mode():
                u = torch.empty(ck * blk, device=xf.device, dtype=torch.float32)
                for i in range(bsz):
                    xi, yi = xf[i], yf[i]
                    for f0 in range(bounds[k], bounds[k + 1], blk):
                        f1 = min(bounds[k + 1], f0 + blk)
                        n = (f1 - f0) // 16 * 16
                        if n:
                            nw = n // 16
                            ub = u[: ck * n].view(16, cin, b, nw)
                            torch.mul(xi[:, f0 : f0 + n].view(cin, 16, nw).transpose(0, 1)[:, :, None],
                                      spec2[:, f0 : f0 + n].view(b, 16, nw).transpose(0, 1)[:, None], out=ub)
                            out = F.conv2d(ub.view(16, ck, 1, nw), w4)
                            yi[:, f0 : f0 + n].view(cout, 16, nw).copy_(out.view(16, cout, nw).transpose(0, 1))
                        if f0 + n < f1:  # < 16 leftover frequencies
                            tail = xi[:, None, f0 + n : f1] * spec2[None, :, f0 + n : f1]
                            torch.mm(wmat, tail.reshape(ck, f1 - f0 - n), out=yi[:, f0 + n : f1])

        run_parts(work, nthreads, in_pool=xf.device.type == "cpu")
        return yf

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> SREConv2d:
        self._mask_spectra = {}  # device or dtype changes: recompute the mask spectra lazily
        applied: SREConv2d = super()._apply(fn, *args, **kwargs)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        return applied


def set_forward_path(module: nn.Module, path: str) -> nn.Module:
    """Force (or reset with "auto") the forward path of every SREConv2d inside ``module``."""
    if path not in FORWARD_PATHS:
        raise ValueError(f"path must be one of {FORWARD_PATHS}, got {path!r}")
    for m in module.modules():
        if isinstance(m, SREConv2d):
            m.path = path
    return module
