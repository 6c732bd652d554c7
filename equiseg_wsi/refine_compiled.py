"""The compiled kernels of `refine_kernel` (imported only when the refinement first runs: numba takes about
0.4 s to import). Module-level functions, so numba caches their machine code on disk between processes."""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["refine", "running_sums", "window"]


@njit(nogil=True, boundscheck=False, cache=True)
def running_sums(lab: np.ndarray, img: np.ndarray, cluster: int, sums: np.ndarray,
                 with_colour: bool) -> None:  # pragma: no cover - compiled, tested through refine_kernel
    # sums[0]: running count of `cluster` over the padded labels; sums[1..3]: of its pixels' colour channels.
    # sums[:, 0, :] and sums[:, :, 0] stay zero.
    h, w = lab.shape
    planes = 4 if with_colour else 1
    for y in range(h):
        for p in range(planes):
            row = 0
            for x in range(w):
                if lab[y, x] == cluster:
                    row += 1 if p == 0 else img[y, x, p - 1]
                sums[p, y + 1, x + 1] = sums[p, y, x + 1] + row


@njit(nogil=True, boundscheck=False, cache=True)
def window(sums: np.ndarray, plane: int, y: int, x: int, n: int) -> int:  # pragma: no cover - compiled
    # the sum of `plane` over the n x n window whose top-left is padded pixel (y, x): pixel (y, x) of the block
    total: int = sums[plane, y + n, x + n] - sums[plane, y, x + n] - sums[plane, y + n, x] + sums[plane, y, x]
    return total


@njit(nogil=True, boundscheck=False, cache=True)
def refine(lab: np.ndarray, img: np.ndarray, fine: np.ndarray, radius: int, need: float,
           k: int) -> np.ndarray:  # pragma: no cover - compiled, tested through refine_kernel
    h, w = fine.shape
    n = 2 * radius + 1
    sums = np.zeros((4, lab.shape[0] + 1, lab.shape[1] + 1), dtype=np.int64)
    supported = np.zeros((h, w), dtype=np.int32)
    present = np.zeros(k + 1, dtype=np.bool_)
    for y in range(h):
        for x in range(w):
            if 0 < fine[y, x] <= k:
                present[fine[y, x]] = True
    for cluster in range(1, k + 1):
        if not present[cluster]:
            continue
        running_sums(lab, img, cluster, sums, False)
        for y in range(h):
            for x in range(w):
                count = window(sums, 0, y, x, n)
                if count >= need:
                    supported[y, x] += 1
    out: np.ndarray = fine.copy()
    best = np.full((h, w), np.inf)
    for cluster in range(1, k + 1):
        if not present[cluster]:
            continue
        running_sums(lab, img, cluster, sums, True)
        for y in range(h):
            for x in range(w):
                s = supported[y, x]
                if not (s > 1 or (fine[y, x] == 0 and s > 0)):
                    continue  # not a border pixel: its cell's label stands
                count = window(sums, 0, y, x, n)
                if count < need:
                    continue
                dist = 0.0
                for c in range(1, 4):  # squared colour distance to the local mean, channels in order
                    diff = img[y + radius, x + radius, c - 1] - window(sums, c, y, x, n) / max(count, 1)
                    dist += diff * diff
                if dist < best[y, x]:  # strictly smaller: ties keep the lower cluster id
                    best[y, x] = dist
                    out[y, x] = cluster
    return out
