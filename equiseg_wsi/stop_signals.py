"""SIGTERM and SIGHUP handled like Ctrl-C (SIGINT): the run stops where it is, cleans up and records what it
completed (see `equiseg_wsi.runner.run_folder`).

`stop_on_signals()` makes SIGTERM and SIGHUP raise `StopSignal`, a `KeyboardInterrupt`, in the main thread,
so every `finally` and `except BaseException` that already cleans up after Ctrl-C (atomic writes, scratch
folders, a Dask cluster) cleans up after them too. A second signal while the first is being handled is raised
again, so a run that hangs in its cleanup can still be stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["StopSignal", "signal_name", "signal_number", "stop_on_signals"]

STOP_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class StopSignal(KeyboardInterrupt):
    """A stop signal other than SIGINT, raised where the main thread was when it arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_number(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt: its StopSignal's, else SIGINT (Ctrl-C)."""
    return exc.signum if isinstance(exc, StopSignal) else int(signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise StopSignal(signum)


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, `signums` raise `StopSignal`; the previous handlers come back on exit. Outside the
    main thread (where handlers cannot be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        if previous[s] is signal.SIG_IGN:  # nohup and friends asked for this signal to be ignored: keep that
            continue
        signal.signal(s, _raise_stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
