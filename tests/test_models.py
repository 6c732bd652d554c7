"""SRE-ResNet-18 and its standard twin: layout, equivariance, reference checkpoint compatibility."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from equiseg_wsi.features import FeatureExtractor
from equiseg_wsi.models.resnet import ArchSpec, build_model
from equiseg_wsi.models.weights import LoadedModel, load_weights, random_model


def load_reference_resnet():
    """Reference sre-conv==1.0.2 modules loaded from their files (its __init__ needs torchio/torchvision)."""
    spec = importlib.util.find_spec("SRE_Conv")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0])
    if not (base / "sre_conv.py").is_file() or not (base / "sre_resnet.py").is_file():
        return None
    if "SRE_Conv.sre_resnet" in sys.modules:
        return sys.modules["SRE_Conv.sre_resnet"]
    pkg = types.ModuleType("SRE_Conv")
    pkg.__path__ = [str(base)]
    sys.modules.setdefault("SRE_Conv", pkg)
    for name in ("sre_conv", "sre_resnet"):
        s = importlib.util.spec_from_file_location(f"SRE_Conv.{name}", base / f"{name}.py")
        m = importlib.util.module_from_spec(s)
        sys.modules[f"SRE_Conv.{name}"] = m
        s.loader.exec_module(m)
    return sys.modules["SRE_Conv.sre_resnet"]


DATA = Path(__file__).parent / "data"
SMALL = dict(widths=(8, 16, 16, 16))
NP_TRANSFORMS = {
    "rot90": lambda a: np.rot90(a, 1, (1, 2)),
    "rot180": lambda a: np.rot90(a, 2, (1, 2)),
    "rot270": lambda a: np.rot90(a, 3, (1, 2)),
    "hflip": lambda a: a[:, :, ::-1],
    "vflip": lambda a: a[:, ::-1],
}


def crc_tile() -> np.ndarray:
    return tifffile.imread(DATA / "CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif")


def extractor(kind: str, seed: int = 0, **arch) -> FeatureExtractor:
    return FeatureExtractor.from_weights(None, seed=seed, arch=ArchSpec(kind=kind, **arch), device="cpu")


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_reference_key_layout() -> None:
    keys = set(build_model(ArchSpec(num_classes=10)).state_dict())
    for k in ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.1.conv2.weight",
              "layer2.0.conv1.1.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.2.running_mean",
              "layer4.1.bn2.weight", "fc.weight", "fc.bias"]:
        assert k in keys, k
    assert "layer1.0.downsample.1.weight" not in keys
    m = build_model(ArchSpec())
    assert m.conv1.weight.shape == (64, 3, 3)
    n_params = sum(p.numel() for p in m.parameters())
    assert 3.9e6 < n_params < 4.1e6  # ~4.0 M (DESIGN 3.2)
    twin = build_model(ArchSpec(kind="standard"))
    assert twin.layer1[0].conv1.weight.shape == (64, 64, 9, 9)
    assert sum(p.numel() for p in twin.parameters()) > 2 * n_params


def test_archspec_round_trip_rebuilds() -> None:
    spec = ArchSpec(kind="standard", stem_kernel=7, kernel_sizes=(5, 5, 3, 3), widths=(8, 8, 16, 16), num_classes=3)
    again = ArchSpec.from_dict(spec.to_dict())
    assert again == spec
    a, b = build_model(spec, seed=4), build_model(again, seed=4)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError):
        ArchSpec(kind="other")


def test_strides_and_channels() -> None:
    spec = ArchSpec(**SMALL)
    m = build_model(spec, seed=0).eval()
    with torch.inference_mode():
        f = m.features(torch.randn(1, 3, 32, 32), ("stem", "layer1", "layer2", "layer3", "layer4"))
    assert {k: tuple(v.shape[1:]) for k, v in f.items()} == {
        "stem": (8, 32, 32), "layer1": (8, 32, 32), "layer2": (16, 16, 16), "layer3": (16, 8, 8),
        "layer4": (16, 4, 4)}
    assert spec.layer_strides() == {"stem": 1, "layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}


@pytest.mark.parametrize("stem", [5, 7])
def test_sre_extractor_exactly_equivariant(stem: int) -> None:
    ex = extractor("sre", stem_kernel=stem, **SMALL)
    ex.layers = ("layer2", "layer4")  # also checks the concatenation/upsampling path
    ex._strides = {"layer2": 2, "layer4": 8}
    ex.stride, ex.channels = 2, 32
    img = crc_tile()[:64, :64]
    base = ex.extract(img)
    for name, t in NP_TRANSFORMS.items():
        out = ex.extract(np.ascontiguousarray(t(img[None])[0]))
        assert max_rel(out, np.ascontiguousarray(t(base))) < 1e-5, name


def test_full_sre_resnet18_exactly_equivariant() -> None:
    ex = FeatureExtractor.from_weights("random", seed=0, device="cpu", arch=ArchSpec())  # the published widths
    img = crc_tile()[:64, :64]
    base = ex.extract(img)
    assert base.shape == (1, 8, 8, 512)
    for name in ("rot90", "hflip"):
        t = NP_TRANSFORMS[name]
        out = ex.extract(np.ascontiguousarray(t(img[None])[0]))
        assert max_rel(out, np.ascontiguousarray(t(base))) < 1e-5, name


def test_standard_twin_is_not_equivariant() -> None:
    ex = extractor("standard", **SMALL)
    img = crc_tile()[:64, :64]
    base = ex.extract(img)
    for name, t in NP_TRANSFORMS.items():
        out = ex.extract(np.ascontiguousarray(t(img[None])[0]))
        assert max_rel(out, np.ascontiguousarray(t(base))) > 1e-2, name


def _rot45_error(ex: FeatureExtractor, img: np.ndarray) -> float:
    """Relative feature error between f(rotate(img, 45)) rotated back and f(img), inside a centre disk."""
    rot = ndimage.rotate(img.astype(np.float32), 45, axes=(0, 1), reshape=False, order=1, mode="reflect")
    f0 = ex.extract(img)[0]
    f1 = ex.extract(np.clip(rot, 0, 255).round().astype(np.uint8))[0]
    back = ndimage.rotate(f1, -45, axes=(0, 1), reshape=False, order=1)
    h = f0.shape[0]
    yy, xx = np.mgrid[:h, :h] - (h - 1) / 2
    disk = np.hypot(yy, xx) < h / 4
    return float(np.linalg.norm(back[disk] - f0[disk]) / np.linalg.norm(f0[disk]))


def test_45_degrees_sre_much_closer_than_twin() -> None:
    img = crc_tile()[16:208, 16:208].astype(np.float32)
    img = ndimage.gaussian_filter(img, sigma=(2, 2, 0)).round().astype(np.uint8)  # smooth real image
    arch = dict(widths=(16, 16, 32, 32))
    sre = np.mean([_rot45_error(extractor("sre", seed=s, **arch), img) for s in (0, 1)])
    std = np.mean([_rot45_error(extractor("standard", seed=s, **arch), img) for s in (0, 1)])
    assert sre < 0.5 * std, (sre, std)


def test_reference_checkpoint_gives_same_layer4(tmp_path: Path) -> None:
    ref_mod = load_reference_resnet()
    if ref_mod is None:
        pytest.skip("reference SRE_Conv files (pip install --no-deps sre-conv==1.0.2) are not installed")
    torch.manual_seed(0)
    ref = ref_mod.sre_resnet18(sre_conv_size=[9, 9, 5, 5], skip_first_maxpool=True, num_classes=9)
    with torch.no_grad():  # trained-like statistics; ring weights rescaled to keep activations sane
        for mod in ref.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
            elif hasattr(mod, "weight_index_mat"):
                mod.weight /= mod.weight_index_mat[0, 0].sum(1)
    path = tmp_path / "ref.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}, "epoch": 3}, path)
    ref.eval()
    img = crc_tile()
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        want = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.relu(ref.bn1(ref.conv1(x)))))))
    loaded: LoadedModel = load_weights(path)
    assert loaded.arch == ArchSpec(num_classes=9)
    assert loaded.source.startswith("sha256:")
    got = FeatureExtractor(loaded, device="cpu").extract(img)
    want_np = want[0].permute(1, 2, 0).numpy()
    assert max_rel(got[0], want_np) < 1e-4


def test_random_init_activation_scale() -> None:
    img = crc_tile()[:64, :64]
    f = FeatureExtractor(random_model(ArchSpec(), seed=0), device="cpu").extract(img)
    assert 1e-2 < float(np.abs(f).mean()) < 1e2  # order one (the reference init reaches ~1e7)


@pytest.mark.parametrize("path", ["auto", "fft", "ring"])
def test_fused_inference_equals_module_by_module(path: str) -> None:
    """Inference folds BN into the convs and fuses residual + ReLU; eval with autograd runs the modules."""
    from equiseg_wsi.models.sre_conv import set_forward_path

    torch.manual_seed(0)
    model = set_forward_path(build_model(ArchSpec(kind="sre", **SMALL), seed=3).eval(), path)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        fused = model.features(x, ("stem", "layer4"))
    with torch.enable_grad():
        plain = model.features(x, ("stem", "layer4"))
    for k in fused:
        assert max_rel(fused[k].numpy(), plain[k].detach().numpy()) < 1e-5, k
