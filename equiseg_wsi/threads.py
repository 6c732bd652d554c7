"""A map over a thread pool that yields results in input order, with a bounded number of items in flight.

Why: a run-wide fit computes the features of two inputs at once (each on one torch thread), and the order of
the results decides the order of the fitted rows, so it must not depend on which thread finishes first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

__all__ = ["in_order", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


def in_order(submit: Callable[[T], Any], items: Iterable[T], ahead: int,
             settle: Callable[[list[Any]], object] | None = None) -> Iterator[Any]:
    """The results of `submit(item)` (a future: `concurrent.futures` or Dask) in input order, with at most `ahead`
    futures submitted and not yet yielded. On exit (done, an error, the consumer gone) the futures not yielded
    are cancelled and passed to `settle` (e.g. to wait for those already running)."""
    pending: deque[Any] = deque()
    todo = iter(items)
    try:
        while True:
            for item in todo:
                pending.append(submit(item))
                if len(pending) >= ahead:
                    break
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        if settle is not None:
            settle(list(pending))


def ordered_map(func: Callable[[T], R], items: Iterable[T], threads: int,
                initializer: Callable[[], None] | None = None) -> Generator[R, None, None]:
    """`func(item)` for each item, on `threads` threads (inline when 1), yielded in input order; at most
    `threads + 1` items are started ahead of the one yielded. An exception (or Ctrl-C while waiting) cancels the
    items not started and waits for the running ones before it goes on: their threads cannot be stopped."""
    if threads <= 1:
        for item in items:
            yield func(item)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="equiseg", initializer=initializer) as pool:
        yield from in_order(lambda item: pool.submit(func, item), items, threads + 1, settle=wait)
