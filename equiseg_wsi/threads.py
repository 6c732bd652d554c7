"""A map over a thread pool that yields results in input order, with a bounded number of items in flight.

Why: a run-wide fit computes the features of two inputs at once (each on one torch thread), and the order of
the results decides the order of the fitted rows, so it must not depend on which thread finishes first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

__all__ = ["ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(func: Callable[[T], R], items: Iterable[T], threads: int,
                initializer: Callable[[], None] | None = None) -> Iterator[R]:
    """`func(item)` for each item, on `threads` threads (inline when 1), yielded in input order; at most
    `threads + 1` items are started ahead of the one yielded. An exception (or Ctrl-C while waiting) cancels the
    items not started and waits for the running ones before it goes on: their threads cannot be stopped."""
    if threads <= 1:
        for item in items:
            yield func(item)
        return
    pending: deque[Future[R]] = deque()
    todo = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="equiseg", initializer=initializer) as pool:
        try:
            while True:
                for item in todo:
                    pending.append(pool.submit(func, item))
                    if len(pending) > threads:
                        break
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            wait(pending)
