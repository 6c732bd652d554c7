"""SRE convolution layer: ring geometry, forward paths, exact equivariance, no stale kernels."""

from __future__ import annotations

import pytest
import torch

from equiseg_wsi.models import ring_kernel
from equiseg_wsi.models.sre_conv import SREConv2d, choose_path, num_rings, ring_masks

TRANSFORMS = {
    "rot90": lambda t: torch.rot90(t, 1, (-2, -1)),
    "rot180": lambda t: torch.rot90(t, 2, (-2, -1)),
    "rot270": lambda t: torch.rot90(t, 3, (-2, -1)),
    "hflip": lambda t: torch.flip(t, (-1,)),
    "vflip": lambda t: torch.flip(t, (-2,)),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("k,sizes", [(3, [1, 8]), (5, [1, 8, 12]), (7, [1, 8, 12, 16]), (9, [1, 8, 12, 16, 32])])
def test_ring_masks_geometry(k: int, sizes: list[int]) -> None:
    m = ring_masks(k)
    assert m.shape == (num_rings(k), k, k) == (k // 2 + 1, k, k)
    assert m.sum(dim=(1, 2)).tolist() == sizes
    assert m.sum(0).max() == 1  # rings are disjoint
    if k >= 5:  # distance >= K//2 + 0.5: corners are zero (for K = 3 the corners are at 1.41 < 1.5)
        assert m[:, 0, 0].sum() == 0 and m[:, -1, -1].sum() == 0
    assert m[0, k // 2, k // 2] == 1  # ring 0 is the centre
    for t in TRANSFORMS.values():
        assert torch.equal(t(m), m)


def test_weight_shape_matches_reference_layout() -> None:
    conv = SREConv2d(3, 64, 5)
    assert tuple(conv.weight.shape) == (64, 3, 3)
    assert list(conv.state_dict()) == ["weight"]  # masks are geometry, not saved
    assert list(SREConv2d(4, 4, 3, bias=True).state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("k", [3, 5, 9])
@pytest.mark.parametrize("groups,bias", [(1, False), (1, True), (2, True)])
def test_forward_paths_agree(k: int, groups: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = SREConv2d(8, 6, k, bias=bias, groups=groups).eval()
    if bias:
        torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 8, 24, 20)
    outs = {}
    for path in ("dense", "ring", "fft"):
        conv.path = path
        with torch.inference_mode():
            outs[path] = conv(x)
    assert outs["dense"].shape == (2, 6, 24, 20)
    assert rel(outs["ring"], outs["dense"]) < 1e-5
    assert rel(outs["fft"], outs["dense"]) < 1e-5


def test_fft_path_is_differentiable() -> None:
    conv = SREConv2d(4, 4, 5, path="fft")
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    conv(x).square().sum().backward()
    conv2 = SREConv2d(4, 4, 5, path="dense")
    conv2.load_state_dict(conv.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    conv2(x2).square().sum().backward()
    assert rel(conv.weight.grad, conv2.weight.grad) < 1e-4
    assert rel(x.grad, x2.grad) < 1e-4


@pytest.mark.parametrize("path", ["dense", "ring", "fft"])
@pytest.mark.parametrize("k", [3, 5, 9])
def test_layer_exactly_equivariant(path: str, k: int) -> None:
    torch.manual_seed(1)
    conv = SREConv2d(4, 5, k, path=path).eval()
    x = torch.randn(1, 4, 64, 64)
    with torch.inference_mode():
        y = conv(x)
        for name, t in TRANSFORMS.items():
            assert rel(conv(t(x)), t(y)) < 1e-5, name


def test_weights_loaded_after_eval_are_used() -> None:
    torch.manual_seed(2)
    conv = SREConv2d(3, 4, 5).eval()
    x = torch.randn(1, 3, 16, 16)
    new = {"weight": torch.randn_like(conv.weight)}
    for path in ("dense", "ring", "fft"):
        conv.path = path
        before = conv(x).detach()
        conv.load_state_dict(new)
        after = conv(x).detach()
        fresh = SREConv2d(3, 4, 5, path="dense")
        fresh.load_state_dict(new)
        assert rel(after, fresh(x).detach()) < 1e-5
        assert rel(before, after) > 1e-2 or path != "dense"
        conv.load_state_dict({"weight": torch.randn_like(conv.weight)})


def test_seeded_init_and_activation_scale() -> None:
    a = SREConv2d(16, 16, 9, generator=torch.Generator().manual_seed(5))
    b = SREConv2d(16, 16, 9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.weight, b.weight)
    # a constant (maximally smooth) input keeps its scale: sum over rings of n_r * w_r ~ O(1)
    x = torch.ones(1, 16, 32, 32)
    y = a(x)[..., 8:-8, 8:-8]
    assert 0.05 < y.std().item() < 5


def test_auto_choice_and_validation() -> None:
    cpu = torch.device("cpu")
    assert choose_path(cpu, 64, 64, 9, 512, 512) == "fft"
    assert choose_path(cpu, 3, 64, 5, 512, 512) == "dense"
    assert choose_path(torch.device("cuda"), 64, 64, 9, 512, 512) == "dense"
    with pytest.raises(ValueError):
        SREConv2d(3, 4, 4)
    with pytest.raises(ValueError):
        SREConv2d(3, 4, 3, path="winograd")


@pytest.mark.parametrize("path", ["dense", "ring", "fft"])
@pytest.mark.parametrize("residual,relu", [(False, False), (False, True), (True, True)])
def test_forward_fused_equals_conv_bn_residual_relu(path: str, residual: bool, relu: bool) -> None:
    """BN folded into the weights (FFT: shift at the DC coefficient), residual and ReLU fused: same result."""
    torch.manual_seed(3)
    conv = SREConv2d(6, 8, 5, bias=True, path=path).eval()
    torch.nn.init.normal_(conv.bias)
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, 6, 20, 18)
    res = torch.randn(2, 8, 20, 18) if residual else None
    with torch.inference_mode():
        want = bn(conv(x)) + (res if residual else 0)
        want = torch.relu(want) if relu else want
        scale = torch.rsqrt(bn.running_var + bn.eps) * bn.weight
        got = conv.forward_fused(x, scale, bn.bias - bn.running_mean * scale, residual=res, relu=relu)
    assert (got.is_contiguous() or got.is_contiguous(memory_format=torch.channels_last)) and got.shape == want.shape
    assert rel(got, want) < 1e-5


def test_fft_path_several_blocks_and_threads() -> None:
    """Frequency range split into blocks, one chunk per worker thread, < 16-frequency tails: same as dense."""
    torch.manual_seed(4)
    conv = SREConv2d(8, 12, 5).eval()
    x = torch.randn(3, 8, 60, 52)
    with torch.inference_mode():
        want = conv._forward_dense(x)
        got = conv._forward_fft(x, block_floats=1).contiguous()  # smallest blocks (1024 values)
    assert rel(got, want) < 1e-5


def test_auto_rule_small_maps() -> None:
    cpu = torch.device("cpu")
    assert choose_path(cpu, 512, 512, 5, 64, 64) == "fft"
    assert choose_path(cpu, 256, 256, 5, 32, 32) == "fft"
    assert choose_path(cpu, 32, 32, 5, 32, 32) == "dense"
    assert choose_path(cpu, 64, 64, 3, 512, 512) == "dense"
    # with the compiled ring kernel (CPU inference) every SRE layer of the ResNet, the stem included, takes it
    for shape in [(3, 64, 5, 512, 512), (64, 64, 9, 512, 512), (512, 512, 5, 64, 64), (32, 32, 5, 8, 8)]:
        assert choose_path(cpu, *shape, compiled_ring=True) == "ring"
    assert choose_path(cpu, 64, 64, 1, 64, 64, compiled_ring=True) == "dense"
    assert choose_path(torch.device("cuda"), 64, 64, 9, 512, 512, compiled_ring=True) == "dense"


@pytest.mark.skipif(not ring_kernel.available(), reason="numba is not installed")
@pytest.mark.parametrize("cin,cout,k,h,w,batch", [
    (3, 16, 5, 40, 37, 2),  # stem-like, width not a multiple of 16
    (16, 24, 9, 70, 33, 1),  # several strips per thread
    (8, 8, 9, 3, 5, 2),  # image smaller than the kernel
    (8, 4, 1, 6, 7, 1),  # K = 1: one ring
])
def test_compiled_ring_kernel_matches_dense(cin: int, cout: int, k: int, h: int, w: int, batch: int) -> None:
    """The compiled kernel (strips, threads, zero padding at every border, fused bias/residual/ReLU) = dense."""
    torch.manual_seed(7)
    conv = SREConv2d(cin, cout, k, bias=True).eval()
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(batch, cin, h, w)
    res = torch.randn(batch, cout, h, w).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = torch.relu(conv._forward_dense(x, conv.weight, conv.bias) + res)
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            got = ring_kernel.ring_conv(xin, conv.weight, k, conv.bias, residual=res, relu=True)
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert rel(got, want) < 1e-5
        conv.path = "ring"
        assert rel(conv(x), conv._forward_dense(x, conv.weight, conv.bias)) < 1e-5


def test_ring_path_trains_with_autograd() -> None:
    """With autograd the ring path stays differentiable (PyTorch ops), gradients equal the dense path's."""
    torch.manual_seed(8)
    x = torch.randn(1, 4, 12, 12)
    grads = []
    for path in ("ring", "dense"):
        conv = SREConv2d(4, 6, 5, path=path, generator=torch.Generator().manual_seed(1))
        conv(x).square().sum().backward()
        grads.append(conv.weight.grad)
    assert rel(grads[0], grads[1]) < 1e-5
