"""Work spread over forked worker processes (Linux), for the two places a run does two inputs at once.

Why: the run-wide fit (two inputs' network at once) and the segmentation of cached slides are Python, NumPy and
torch calls that hold the GIL often enough that two threads kept about 1.4 of 2 cores busy; two forked processes
keep about 1.9 (200 EBHI tiles: fit pass 19.9-24.6 -> 16.2-18.1 s, segmentation pass 10.0 -> 5.5 s; outputs
byte-identical). A forked worker starts warm: the parent's modules, network, compiled kernels and the function
to run are already in it (nothing is pickled but the items and results). Each runs its torch ops on one thread:
a forked child must not enter the parent's OpenMP pool.

Stop signals (Ctrl-C, SIGTERM, SIGHUP) reach the whole process group; workers ignore them and the parent decides
(no new item starts, the running ones finish). Workers die with the parent (`PR_SET_PDEATHSIG`). Callbacks the
work makes (progress, region names) are relayed to this process and called here, on one thread.

A known hazard: a process that has run the network on Python threads itself before it forks can get a worker that
spins forever in MKL's allocator (`mm_account_ptr_by_tid`); `benchmarks/repro_fork_mkl.py` reproduces it (a
benchmark's CNN timing repeated in one process). So MKL's cached buffers are released before each fork
(`release_mkl_buffers`). An `equiseg run` does no network work in the parent before it forks.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from equiseg_wsi.errors import EquisegError
from equiseg_wsi.stop_signals import STOP_SIGNALS
from equiseg_wsi.threads import in_order

__all__ = ["USE_PROCESSES", "Relay", "WorkerDiedError", "end_workers", "forked_map", "process_pool",
           "release_mkl_buffers", "use_processes"]

USE_PROCESSES = sys.platform.startswith("linux")  # where fork makes a warm worker; threads elsewhere

T = TypeVar("T")
R = TypeVar("R")

_TASKS: dict[int, Callable[[Any], Any]] = {}  # what the workers of a `forked_map` run, inherited by the fork
_ids = itertools.count()


def use_processes(device: Any) -> bool:
    """Whether work for a network on `device` (a torch.device or its name) goes to forked workers: on the CPU only,
    since a forked child cannot use its parent's CUDA (or MPS) context; GPU runs keep threads."""
    return USE_PROCESSES and str(getattr(device, "type", device)) == "cpu"


class WorkerDiedError(EquisegError):
    """A worker process ended without a result (killed: usually the out-of-memory killer)."""


def _worker_init(parent: int, initializer: Callable[[], None] | None) -> None:
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    if initializer is not None:
        initializer()


def release_mkl_buffers() -> bool:
    """Hand MKL's cached buffers back before a fork; False where torch has no MKL (or its symbol is not there).

    Why: after this process had run the network on Python threads, a forked worker's first matrix product could
    spin forever in MKL's allocator (`benchmarks/repro_fork_mkl.py`, 20 EBHI tiles, 2026-12-04: 7 of 24 rounds hung
    without the release, 0 of 29 with it on a quiet machine; MKL_DISABLE_FAST_MM=1 did not help, waiting for the
    threads to exit neither). torch links MKL statically and exports only this internal name for `mkl_free_buffers`."""
    free = _mkl_free_buffers() if USE_PROCESSES and "torch" in sys.modules else None
    if free is None:
        return False
    free()
    return True


@functools.lru_cache(maxsize=1)
def _mkl_free_buffers() -> Callable[[], None] | None:
    import ctypes

    torch = sys.modules["torch"]
    library = os.path.join(os.path.dirname(str(torch.__file__)), "lib", "libtorch_cpu.so")
    try:
        free = ctypes.CDLL(library).mkl_serv_free_buffers
    except (OSError, AttributeError):
        return None
    free.restype = None
    return free


def process_pool(workers: int, initializer: Callable[[], None] | None = None) -> ProcessPoolExecutor:
    """`workers` forked processes (started at the first submit, all at once: the fork copies this process then).
    MKL's buffers are released first (`release_mkl_buffers`)."""
    release_mkl_buffers()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_init, initargs=(os.getpid(), initializer))


def end_workers(pool: Any) -> None:
    """After a worker died: end the others with SIGKILL. They ignore SIGTERM, the executor's way of ending them
    when its pool breaks, and it would wait for them forever (`_processes`: private, in every Python since 3.7)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.kill()


def _run_task(task: int, item: Any) -> Any:
    return _TASKS[task](item)


def forked_map(func: Callable[[T], R], items: Iterable[T], workers: int,
               initializer: Callable[[], None] | None = None) -> Generator[R, None, None]:
    """`func(item)` for each item on `workers` forked processes, yielded in input order, at most `workers + 1`
    items started ahead of the one yielded (as `threads.ordered_map`); `func` may be a closure. A worker that
    dies raises `WorkerDiedError`; an exception in `func` is raised here as it was raised there."""
    task = next(_ids)
    _TASKS[task] = func
    try:
        with process_pool(workers, initializer) as pool:
            try:
                yield from in_order(lambda item: pool.submit(_run_task, task, item), items, workers + 1,
                                    settle=wait)
            except BrokenProcessPool as exc:
                end_workers(pool)
                raise WorkerDiedError("a worker process died before finishing its input (out of memory?); nothing "
                                      "was recorded: rerun the same command") from exc
    finally:
        del _TASKS[task]


class Relay:
    """Callbacks made in forked workers, called in this process by one thread (in the order they were made).

    `wrap(fn)` before the workers are forked; use the wrapped function in the work; the block ends after every
    relayed call has been made here."""

    def __init__(self) -> None:
        self._queue: Any = multiprocessing.get_context("fork").SimpleQueue()
        self._targets: list[Callable[..., None]] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def wrap(self, fn: Callable[..., None] | None) -> Callable[..., None] | None:
        if fn is None:
            return None
        index = len(self._targets)
        self._targets.append(fn)
        queue = self._queue
        return lambda *args: queue.put((index, args))

    def _drain(self) -> None:
        """Polls rather than waiting for an end marker: a worker killed while writing holds the queue's lock."""
        while True:
            if not self._queue.empty():
                index, args = self._queue.get()
                with contextlib.suppress(Exception):  # a progress display's error must not stop the run
                    self._targets[index](*args)
            elif self._done.is_set():
                return
            else:
                self._done.wait(0.02)

    def __enter__(self) -> Relay:
        self._thread = threading.Thread(target=self._drain, name="equiseg-relay", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        self._queue.close()
