"""`threads.ordered_map`: results in input order whichever thread finishes first, a bounded number started
ahead, and an error waits for the items already running before it goes on."""

from __future__ import annotations

import threading
import time

import pytest

from equiseg_wsi.threads import ordered_map


def test_results_come_in_input_order() -> None:
    def slow_first(i: int) -> int:
        time.sleep(0.05 if i % 3 == 0 else 0.0)
        return i * i

    assert list(ordered_map(slow_first, range(10), 2)) == [i * i for i in range(10)]


def test_one_thread_runs_inline() -> None:
    names = list(ordered_map(lambda _i: threading.current_thread().name, range(3), 1))
    assert names == [threading.current_thread().name] * 3


def test_the_initializer_runs_in_every_worker_thread_only() -> None:
    seen: set[str] = set()
    main = threading.current_thread().name
    names = list(ordered_map(lambda _i: threading.current_thread().name, range(6), 2,
                             initializer=lambda: seen.add(threading.current_thread().name)))
    assert main not in seen and set(names) <= seen


def test_at_most_threads_plus_one_items_are_started_ahead() -> None:
    started: list[int] = []
    results = ordered_map(lambda i: started.append(i) or i, range(20), 2)
    assert next(results) == 0
    time.sleep(0.05)
    assert len(started) <= 4  # the one yielded, and threads + 1 waiting behind it
    assert list(results) == list(range(1, 20))


def test_an_error_waits_for_the_running_items_and_cancels_the_rest() -> None:
    finished: list[int] = []

    def work(i: int) -> int:
        if i == 1:
            raise ValueError("bad input 1")
        time.sleep(0.1)
        finished.append(i)
        return i

    with pytest.raises(ValueError, match="bad input 1"):
        list(ordered_map(work, range(10), 2))
    assert 0 in finished and max(finished) <= 3  # what was running finished; nothing later started
