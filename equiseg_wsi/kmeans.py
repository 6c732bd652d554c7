"""Seeded k-means++ and Lloyd iterations in NumPy (float64), for the few thousand rows a region's fit samples.

Why not scikit-learn: importing it costs about 0.9 s per process, more than the fit itself takes on a core's
2,000 samples (~20 ms), and a cohort of cores pays it in every worker. The algorithm is the textbook one
(Arthur & Vassilvitskii 2007 seeding with 2 + ln k candidate centres per step, as scikit-learn does; Lloyd until
no centre moves more than `tol` x the mean feature variance); the best of `n_init` seeded starts by inertia.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from equiseg_wsi.blas import one_blas_thread
from equiseg_wsi.threads import ordered_map

__all__ = ["KMeansFit", "kmeans"]

# Lloyd runs from different starts are independent: a large fit (the run-wide one, up to 50,000 x 512 values)
# runs two at a time, each on one BLAS thread, so the result is the one of one thread; a region's fit of a few
# thousand rows stays inline.
LLOYD_THREADS = 2
THREADED_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class KMeansFit:
    centers: np.ndarray  # (k, C) float64
    labels: np.ndarray  # (N,) int64, 0-based
    inertia: float
    n_iter: int


def _sq_dist(x: np.ndarray, x_sq: np.ndarray, c: np.ndarray) -> np.ndarray:
    # a contiguous (C, k) right-hand side: with the transposed view NumPy's matmul is ~15x slower here
    d: np.ndarray = x_sq[:, None] - 2.0 * (x @ np.ascontiguousarray(c.T)) + np.einsum("kc,kc->k", c, c)[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def _seed(x: np.ndarray, x_sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ with greedy local trials: each new centre is the best of a few D²-weighted candidates."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    closest = _sq_dist(x, x_sq, centers[:1])[:, 0]
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct rows than clusters: the caller checks, this is a guard
            centers[i:] = centers[0]
            break
        picks = np.searchsorted(np.cumsum(closest), rng.random(trials) * total)
        picks = np.minimum(picks, n - 1)
        cand = np.minimum(closest[None, :], _sq_dist(x, x_sq, x[picks]).T)
        best = int(np.argmin(cand.sum(axis=1)))
        centers[i] = x[picks[best]]
        closest = cand[best]
    return centers


def _lloyd(x: np.ndarray, x_sq: np.ndarray, centers: np.ndarray, max_iter: int, tol: float
           ) -> tuple[np.ndarray, np.ndarray, float, int]:
    k = centers.shape[0]
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        new_labels = np.argmin(_sq_dist(x, x_sq, centers), axis=1)
        if np.array_equal(new_labels, labels):  # converged exactly: the centres cannot move
            break
        labels = new_labels
        counts = np.bincount(labels, minlength=k)
        sums = (labels[None, :] == np.arange(k)[:, None]).astype(np.float64) @ x
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    d = _sq_dist(x, x_sq, centers)
    labels = np.argmin(d, axis=1)
    inertia = float(d[np.arange(x.shape[0]), labels].sum())
    return centers, labels, inertia, n_iter


def kmeans(x: np.ndarray, k: int, *, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, seed: int = 0
           ) -> KMeansFit:
    """Best of `n_init` k-means++ starts (one generator seeded from `seed`): same inputs, same result."""
    with one_blas_thread():
        return _kmeans(np.asarray(x, dtype=np.float64), k, n_init, max_iter, tol, seed)


def _kmeans(data: np.ndarray, k: int, n_init: int, max_iter: int, tol: float, seed: int) -> KMeansFit:
    x_sq = np.einsum("nc,nc->n", data, data)
    threshold = tol * float(data.var(axis=0).mean())
    rng = np.random.default_rng(seed)
    starts = [_seed(data, x_sq, k, rng) for _ in range(max(1, int(n_init)))]  # drawn in order, as one generator
    threads = LLOYD_THREADS if data.size >= THREADED_ELEMENTS else 1
    best: KMeansFit | None = None
    for centers, labels, inertia, n_iter in ordered_map(lambda c: _lloyd(data, x_sq, c, max_iter, threshold),
                                                         starts, threads):
        if best is None or inertia < best.inertia:
            best = KMeansFit(centers, labels, inertia, n_iter)
    assert best is not None
    return best
