"""A map over a thread pool that yields results in input order, with a bounded number of items in flight, and
slides opened once per thread.

Why: a run-wide fit computes the features of two regions at once (each on one torch thread), and the order of
the results decides the order of the fitted rows, so it must not depend on which thread finishes first; a
slide's reader (a file handle, a decoded level) is never shared between threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

from equiseg_wsi.slide import Slide, open_slide

__all__ = ["ThreadSlides", "ordered_map"]

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


class ThreadSlides:
    """Each thread's own open slide (the last one it asked for); `close` closes every one still open."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[Slide] = []

    def get(self, path: str | os.PathLike[str], backend: str, mpp: float | None) -> Slide:
        key = (str(path), backend, mpp)
        held: tuple[tuple[str, str, float | None], Slide] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == key:
            return held[1]
        if held is not None:
            self._forget(held[1])
        slide = open_slide(path, backend=backend, mpp=mpp)
        with self._lock:
            self._open.append(slide)
        self._local.held = (key, slide)
        return slide

    def _forget(self, slide: Slide) -> None:
        with self._lock:
            self._open.remove(slide)
        with contextlib.suppress(Exception):
            slide.close()

    def close(self) -> None:
        with self._lock:
            slides, self._open = self._open, []
        for slide in slides:
            with contextlib.suppress(Exception):
                slide.close()
