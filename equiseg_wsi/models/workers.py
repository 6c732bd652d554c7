"""A shared pool of single-threaded workers for the CPU convolution paths (coarse-grained parallelism).

Callers split their work into one contiguous chunk per thread and each thread runs its torch ops
single-threaded, so a call costs two thread hand-offs however many small ops its chunk runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["run_parts"]

_POOLS: dict[int, ThreadPoolExecutor] = {}
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: start fresh pools
    os.register_at_fork(after_in_child=_POOLS.clear)


def _worker_pool(n: int) -> ThreadPoolExecutor:
    """Shared pool of ``n`` threads whose torch ops run single-threaded (coarse-grained parallelism)."""
    pool = _POOLS.get(n)
    if pool is None:
        pool = ThreadPoolExecutor(n, thread_name_prefix="sre-fft", initializer=torch.set_num_threads,
                                  initargs=(1,))
        _POOLS[n] = pool
    return pool


def run_parts(work: Callable[[int], None], n: int, in_pool: bool = True) -> None:
    """``work(0) ... work(n - 1)``: on the shared single-threaded pool, or inline for one part."""
    if n == 1 or not in_pool:
        for k in range(n):
            work(k)
    else:
        list(_worker_pool(n).map(work, range(n)))
