"""Dense mask training (the packaged model's recipe): it learns a mask, resumes exactly, refuses a changed
configuration, and the packaged model it produced is exactly rot90/flip-equivariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from equiseg_wsi.errors import InputError
from equiseg_wsi.features import FeatureExtractor
from equiseg_wsi.models.arch import DEFAULT_ARCH
from equiseg_wsi.models.weights import default_weights, load_weights
from equiseg_wsi.training.masks import MaskPair, MaskTrainConfig, load_pairs, train_on_masks

TINY = dict(widths=(4, 8, 8, 8), kernel_sizes=(3, 3, 3, 3), stem_kernel=3, crop=32, batch_size=4, warmup_steps=2)


def _pairs(n: int, seed: int) -> list[MaskPair]:
    """Dark round 'glands' on pink 'stroma' (noise on both): the mask is where the dark discs are."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[:48, :48]
    for i in range(n):
        mask = np.zeros((48, 48), dtype=bool)
        for _ in range(3):
            cy, cx, r = rng.integers(8, 40), rng.integers(8, 40), rng.integers(5, 9)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        rgb = np.where(mask[..., None], [90, 60, 150], [235, 160, 200]).astype(np.float64)
        rgb += rng.normal(0, 12, rgb.shape)
        out.append(MaskPair(np.clip(rgb, 0, 255).astype(np.uint8), mask, f"case{i}"))
    return out


def _state(path) -> dict[str, torch.Tensor]:
    return load_weights(path).model.state_dict()


def test_learns_a_mask_and_keeps_the_best_checkpoint(tmp_path) -> None:
    cfg = MaskTrainConfig(**TINY, steps=60, eval_every=20, lr=1e-2)
    result = train_on_masks(cfg, _pairs(8, 0), _pairs(3, 1), tmp_path)
    bce = [row["select_bce"] for row in result.log]
    assert bce[-1] < bce[0] and result.log[-1]["select_acc"] > 0.8
    assert result.best_step == int(result.log[int(np.argmin(bce))]["step"])
    loaded = load_weights(result.weights)
    assert loaded.layer == "layer4" and loaded.training["best_step"] == result.best_step
    assert loaded.arch == cfg.arch()


def test_resume_gives_the_same_weights(tmp_path) -> None:
    cfg = MaskTrainConfig(**TINY, steps=6, eval_every=2)
    train, select = _pairs(4, 0), _pairs(2, 1)
    straight = train_on_masks(cfg, train, select, tmp_path / "straight")
    first = train_on_masks(cfg, train, select, tmp_path / "stopped", stop_after_s=0.0)
    assert not first.weights.exists() and len(first.log) == 1  # stopped at the first checkpoint
    resumed = train_on_masks(cfg, train, select, tmp_path / "stopped")
    assert [r["select_bce"] for r in resumed.log] == [r["select_bce"] for r in straight.log]
    a, b = _state(straight.weights), _state(resumed.weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changed_configuration_is_refused(tmp_path) -> None:
    train, select = _pairs(2, 0), _pairs(1, 1)
    train_on_masks(MaskTrainConfig(**TINY, steps=2, eval_every=2), train, select, tmp_path)
    with pytest.raises(InputError, match="another configuration"):
        train_on_masks(MaskTrainConfig(**TINY, steps=4, eval_every=2), train, select, tmp_path)


def test_mask_of_another_size_is_named(tmp_path) -> None:
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(tmp_path / "a_mask.png")
    with pytest.raises(InputError, match="a_mask.png: mask is 16 x 8 px, image is 16 x 16"):
        load_pairs([(tmp_path / "a.png", tmp_path / "a_mask.png", "c")])


def test_packaged_model_is_the_mask_trained_one_and_exactly_equivariant() -> None:
    loaded = load_weights(default_weights("sre"))
    assert loaded.arch == DEFAULT_ARCH and loaded.training["recipe"].startswith("dense mask supervision")
    ex = FeatureExtractor.from_weights(None, device="cpu", layer="layer4")
    rng = np.random.default_rng(3)
    tile = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    base = ex.extract(tile)
    for k in (1, 2, 3):
        turned = ex.extract(np.ascontiguousarray(np.rot90(tile, k, axes=(1, 2))))
        np.testing.assert_allclose(turned, np.rot90(base, k, axes=(1, 2)), rtol=0, atol=1e-5 * np.abs(base).max())
    flipped = ex.extract(np.ascontiguousarray(tile[:, :, ::-1]))
    np.testing.assert_allclose(flipped, base[:, :, ::-1], rtol=0, atol=1e-5 * np.abs(base).max())
