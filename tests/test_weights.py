"""Weights: safe loading (nothing executed), clear errors naming file and keys, project round trip."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from equiseg_wsi.errors import WeightsError
from equiseg_wsi.features import FeatureExtractor
from equiseg_wsi.models.resnet import ArchSpec, build_model
from equiseg_wsi.models.weights import identity_hash, infer_arch, load_weights, random_model, save_weights

SMALL = ArchSpec(widths=(8, 16, 16, 16))


class _Evil:
    """Pickles to a call of os.system that would create a marker file if it ever ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(WeightsError) as exc:
        load_weights(path)
    assert str(path) in str(exc.value)
    assert "nothing run" in str(exc.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n", b"\x80\x04K\x01."])
def test_text_empty_and_non_dict_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as exc:
        load_weights(path)
    assert str(path) in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "nope.pth")


def test_other_architecture_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)).state_dict(), path)
    with pytest.raises(WeightsError) as exc:
        load_weights(path)
    assert str(path) in str(exc.value) and "conv1.weight" in str(exc.value)


def test_missing_unexpected_and_wrong_shape_keys_are_named(tmp_path: Path) -> None:
    sd = build_model(SMALL, seed=0).state_dict()
    sd.pop("layer3.1.conv2.weight")
    sd["layer9.extra"] = torch.zeros(1)
    sd["layer2.1.bn1.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as exc:
        load_weights(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "layer3.1.conv2.weight" in msg and "layer9.extra" in msg and "layer2.1.bn1.weight" in msg


def test_expected_arch_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save(build_model(SMALL, seed=0).state_dict(), path)
    assert load_weights(path).arch == SMALL
    with pytest.raises(WeightsError, match="expected"):
        load_weights(path, arch=ArchSpec())


def test_reference_style_prefixes_and_index_buffers(tmp_path: Path) -> None:
    model = build_model(SMALL, seed=1).eval()
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd["module.conv1.weight_index_mat"] = torch.zeros(1, 1, 3, 25)  # reference buffer: ignored
    path = tmp_path / "ref_style.pth"
    torch.save({"state_dict": sd, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    loaded = load_weights(path)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), model(x))


def test_infer_arch_standard_twin() -> None:
    spec = ArchSpec(kind="standard", stem_kernel=7, widths=(8, 8, 16, 16), num_classes=4)
    assert infer_arch(build_model(spec).state_dict()) == spec


def test_project_format_round_trip(tmp_path: Path) -> None:
    spec = ArchSpec(kind="sre", stem_kernel=7, widths=(8, 16, 16, 16))
    src = random_model(spec, seed=7)
    norm = {"mean": [0.7, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    path = save_weights(tmp_path / "w" / "model.pt", src.model, spec, normalization=norm, layer="layer3",
                        provenance={"trained_on": "unit test"}, training={"epochs": 1, "loss": [1.0, 0.5]})
    assert not [p for p in path.parent.iterdir() if p.name != "model.pt"]  # no temp left behind
    loaded = load_weights(path)
    assert loaded.arch == spec and loaded.layer == "layer3" and loaded.normalization == norm
    assert loaded.provenance == {"trained_on": "unit test"} and loaded.training["epochs"] == 1
    ident = loaded.identity()
    assert ident["source"].startswith("sha256:") and ident["layer"] == "layer3"
    src.normalization = norm
    ex_a = FeatureExtractor(src, layers="layer3", device="cpu")
    ex_b = FeatureExtractor(loaded, device="cpu")
    tiles = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ex_a.extract(tiles), ex_b.extract(tiles))


def test_random_model_identity() -> None:
    a, b, c = random_model(SMALL, seed=3), random_model(SMALL, seed=3), random_model(SMALL, seed=4)
    assert a.identity()["source"] == "random-init seed=3"
    assert identity_hash(a.identity()) == identity_hash(b.identity()) != identity_hash(c.identity())
    for (_, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(va, vb)
    ident = a.identity()
    assert ident["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert ident["arch"]["kind"] == "sre" and ident["layer"] == "layer4"
