"""Agreement between two label maps on the tissue both share (the rotation-robustness protocol).

Why only shared tissue: after rotating back, a few border cells are tissue in one map and not the other;
comparing there would measure interpolation, not the features. Positions where either map is 0 are ignored.

- :func:`pixel_agreement` needs the same cluster ids on both sides (true with canonical order and a frozen
  model); :func:`adjusted_rand_index` ignores the ids (any relabelling scores the same).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, NoTissueError

__all__ = ["adjusted_rand_index", "compare_labels", "contingency_table", "mean_dice", "pixel_agreement"]


def _shared(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape:
        raise InputError(f"label maps differ in shape: {x.shape} vs {y.shape}")
    if x.dtype.kind not in "iu" or y.dtype.kind not in "iu":
        raise InputError(f"label maps must hold integers, got {x.dtype} and {y.dtype}")
    if (x.size and x.min() < 0) or (y.size and y.min() < 0):
        raise InputError("label maps must not hold negative values")
    m = (x > 0) & (y > 0)
    if not m.any():
        raise NoTissueError("the two label maps share no tissue (no position labelled in both)")
    return x[m].astype(np.int64), y[m].astype(np.int64)


def contingency_table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts ``n[i, j]`` of shared-tissue positions with label i in ``a`` and j in ``b`` (row/col 0 empty)."""
    x, y = _shared(a, b)
    ka, kb = int(x.max()) + 1, int(y.max()) + 1
    return np.bincount(x * kb + y, minlength=ka * kb).reshape(ka, kb)


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of shared-tissue positions with the same cluster id in both maps."""
    x, y = _shared(a, b)
    return float(np.count_nonzero(x == y) / x.size)


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over clusters present in either map (on shared tissue) of Dice = 2|A∩B| / (|A| + |B|)."""
    x, y = _shared(a, b)
    k = int(max(x.max(), y.max())) + 1
    inter = np.bincount(x[x == y], minlength=k)
    na = np.bincount(x, minlength=k)
    nb = np.bincount(y, minlength=k)
    present = (na + nb) > 0
    present[0] = False
    dice = 2.0 * inter[present] / (na[present] + nb[present])
    return float(dice.mean())


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie) of the two partitions of the shared tissue.

    Computed from the contingency table with exact integer pair counts, in the pair-confusion form used by
    scikit-learn (so the degenerate cases agree: identical partitions give 1.0, including one cluster each).
    1.0 = same partition up to relabelling, about 0 = chance.
    """
    table = contingency_table(a, b)
    n = int(table.sum())
    sum_sq = sum(int(v) * int(v) for v in table.ravel())
    rows_sq = sum(int(v) * int(v) for v in table.sum(axis=1))
    cols_sq = sum(int(v) * int(v) for v in table.sum(axis=0))
    tp = sum_sq - n  # ordered pairs together in both
    fp = cols_sq - sum_sq  # together in b, apart in a (pair-confusion naming as in sklearn)
    fn = rows_sq - sum_sq  # together in a, apart in b
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    num = 2 * (tp * tn - fn * fp)
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    return float(num / den) if den else 1.0


def compare_labels(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """All three scores plus the number of shared positions, as one flat dict for a table row."""
    x, _ = _shared(a, b)
    return {
        "n_shared": float(x.size),
        "pixel_agreement": pixel_agreement(a, b),
        "mean_dice": mean_dice(a, b),
        "adjusted_rand_index": adjusted_rand_index(a, b),
    }
