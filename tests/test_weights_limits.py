"""Weights files are untrusted: a zip bomb, NaN/Inf tensors or a device get a WeightsError naming the file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from equiseg_wsi.errors import WeightsError, one_line
from equiseg_wsi.models import weights
from equiseg_wsi.models.resnet import ArchSpec, build_model
from equiseg_wsi.models.weights import load_weights, save_weights

TINY = ArchSpec(widths=(4, 8, 8, 8))


def _deflated_checkpoint(path: Path, n_bytes: int) -> Path:
    """A real torch checkpoint holding n_bytes of zeros, its entries recompressed: torch reads it fine."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"conv1.weight": torch.zeros(n_bytes // 4)}}, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return path


def test_zip_bomb_is_refused_before_inflating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 1 MiB floor instead of 256 MiB keeps the test light; the ratio rule is the real one.
    monkeypatch.setattr(weights, "_UNPACKED_FLOOR", 1 << 20, raising=False)
    bomb = _deflated_checkpoint(tmp_path / "bomb.pt", 8 << 20)
    assert bomb.stat().st_size < 64 << 10  # 8 MiB of tensor in a few KiB
    inflated = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: inflated.append(1))
    with pytest.raises(WeightsError) as exc:
        load_weights(bomb)
    message = str(exc.value)
    assert message.startswith(f"{bomb}: ") and "would unpack to 8.0 MiB" in message and "zip bomb" in message
    assert one_line(exc.value) == message and not inflated


def test_compressed_but_small_checkpoint_is_still_read(tmp_path: Path) -> None:
    """Below the floor a high ratio is harmless: the check refuses only what would cost real memory."""
    path = _deflated_checkpoint(tmp_path / "small.pt", 1 << 20)
    with pytest.raises(WeightsError, match="conv1.weight has unexpected shape"):  # read, then judged on content
        load_weights(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_key(tmp_path: Path, bad: float) -> None:
    model = build_model(TINY, seed=0)
    with torch.no_grad():
        model.state_dict()["layer2.0.conv2.weight"].view(-1)[3] = bad
        model.state_dict()["layer3.0.conv2.weight"].view(-1)[0] = bad
    path = save_weights(tmp_path / "nan.pt", model, TINY)
    with pytest.raises(WeightsError) as exc:
        load_weights(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and "layer2.0.conv2.weight" in message and "layer3" not in message
    assert "NaN or infinite" in message
    healthy = save_weights(tmp_path / "ok.pt", build_model(TINY, seed=0), TINY)
    assert load_weights(healthy).arch == TINY


def test_non_finite_normalization_is_refused(tmp_path: Path) -> None:
    path = save_weights(tmp_path / "norm.pt", build_model(TINY, seed=0), TINY,
                        normalization={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.0, 0.5]})
    with pytest.raises(WeightsError, match=r"norm\.pt: .*normalization"):
        load_weights(path)


def test_symlink_to_dev_zero_is_not_a_regular_file(tmp_path: Path) -> None:
    link = tmp_path / "weights.pt"
    link.symlink_to("/dev/zero")
    with pytest.raises(WeightsError) as exc:
        load_weights(link)
    assert str(exc.value) == f"{link}: weights file is not a regular file (a character device)"
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "missing.pt")
