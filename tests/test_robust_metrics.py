"""Label-map agreement: identical maps, relabellings, chance level, and ARI against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from equiseg_wsi.errors import InputError, NoTissueError
from equiseg_wsi.robust_metrics import (
    adjusted_rand_index,
    compare_labels,
    contingency_table,
    mean_dice,
    pixel_agreement,
)


def blocky(seed: int, k: int = 3, shape: tuple[int, int] = (60, 80)) -> np.ndarray:
    """A label map of coarse blocks (like a segmentation), with a background border."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, k + 1, size=(shape[0] // 10, shape[1] // 10))
    lab = np.kron(coarse, np.ones((10, 10), dtype=np.int64)).astype(np.int32)
    lab[:3, :] = 0
    lab[:, -2:] = 0
    return lab


def test_identical_maps_score_one() -> None:
    a = blocky(0)
    assert pixel_agreement(a, a) == 1.0
    assert mean_dice(a, a) == 1.0
    assert adjusted_rand_index(a, a) == 1.0
    scores = compare_labels(a, a)
    assert scores["n_shared"] == float(np.count_nonzero(a))
    assert all(isinstance(v, float) for v in scores.values())


def test_permutation_keeps_ari_but_not_agreement() -> None:
    a = blocky(1)
    perm = np.array([0, 3, 1, 2], dtype=np.int32)  # background stays 0
    b = perm[a]
    assert adjusted_rand_index(a, b) == pytest.approx(1.0)
    assert pixel_agreement(a, b) < 0.5


def test_random_relabelling_is_chance() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(1, 4, size=(200, 200)).astype(np.int32)
    b = rng.integers(1, 4, size=(200, 200)).astype(np.int32)
    assert abs(adjusted_rand_index(a, b)) < 0.01
    assert pixel_agreement(a, b) == pytest.approx(1 / 3, abs=0.02)
    assert mean_dice(a, b) == pytest.approx(1 / 3, abs=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_ari_matches_sklearn(seed: int) -> None:
    a = blocky(seed, k=4)
    b = blocky(seed + 100, k=3)
    rng = np.random.default_rng(seed)
    noise = rng.random(a.shape) < 0.1
    b2 = np.where(noise & (a > 0), rng.integers(1, 4, size=a.shape), a).astype(np.int32)
    for other in (b, b2):
        shared = (a > 0) & (other > 0)
        expected = adjusted_rand_score(a[shared], other[shared])
        assert adjusted_rand_index(a, other) == pytest.approx(expected, abs=1e-12)


def test_degenerate_cases_match_sklearn() -> None:
    one = np.ones((5, 5), dtype=np.int32)
    assert adjusted_rand_index(one, one) == adjusted_rand_score(one.ravel(), one.ravel()) == 1.0
    two = one.copy()
    two[:, 2:] = 2
    assert adjusted_rand_index(one, two) == pytest.approx(adjusted_rand_score(one.ravel(), two.ravel()))


def test_only_shared_tissue_counts() -> None:
    a = np.array([[1, 1, 2, 0]], dtype=np.int32)
    b = np.array([[1, 2, 0, 2]], dtype=np.int32)
    assert pixel_agreement(a, b) == 0.5  # only the first two positions are shared
    table = contingency_table(a, b)
    assert table[1, 1] == 1 and table[1, 2] == 1 and table.sum() == 2
    # dice: cluster 1: 2*1/(2+1); cluster 2: 2*0/(0+1)
    assert mean_dice(a, b) == pytest.approx((2 / 3 + 0.0) / 2)


def test_bad_inputs() -> None:
    a = np.zeros((3, 3), dtype=np.int32)
    with pytest.raises(NoTissueError):
        pixel_agreement(a, a)
    with pytest.raises(InputError):
        adjusted_rand_index(np.ones((3, 3), dtype=np.int32), np.ones((3, 4), dtype=np.int32))
    with pytest.raises(InputError):
        mean_dice(np.ones((3, 3)), np.ones((3, 3)))
