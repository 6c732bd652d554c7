"""NumPy's BLAS on one thread for the thin matrix products of KMeans (k columns wide).

Why: OpenBLAS threads spin while they wait for work. When the cores are busy with anything else (a second Dask
worker, the CNN's threads, another job), that spinning starves the thread doing the work. One 10-start KMeans fit
of 50,000 x 128 rows (K = 3) took 39 s with OpenBLAS's default 2 threads on the 2-core development machine under
load, and 1.0 s on one thread. The products are memory-bound, so a second thread gains little on an idle
machine either (see the README's throughput section).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

__all__ = ["one_blas_thread"]


@cache
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


_LOCK = threading.Lock()
_users = 0
_limit: Any = None  # the active threadpoolctl limit while any thread is inside


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Inside: every BLAS library loaded so far (NumPy's OpenBLAS) runs on one thread; restored when the last
    thread inside leaves (the limit is process-wide: slides segmented on two threads share it)."""
    global _users, _limit
    with _LOCK:
        if _users == 0:
            _limit = _controller().limit(limits=1, user_api="blas")
        _users += 1
    try:
        yield
    finally:
        with _LOCK:
            _users -= 1
            if _users == 0:
                _limit.restore_original_limits()
                _limit = None
