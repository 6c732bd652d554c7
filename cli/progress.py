"""What a long command shows while it works: bars on a terminal, timestamped log lines otherwise.

On a terminal: a bar of slides (or cores) and, below it, a bar of the current one's tiles; both are gone or
finished before anything else is printed, so a summary never lands on a leftover bar. When stderr is a file
or a pipe (a batch job, `2>log`): one line when the work starts, one per finished slide, and a line at least
every `interval` seconds while a slide is still running (from a background thread, so even one very long
tile cannot keep the log silent).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm

from equiseg_wsi.biomarkers import is_measured

HEARTBEAT_S = 60.0


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Progress of `total` items (slides, cores) and of the units (tiles) inside the current item.

    `mode` is "bars" (stderr is a terminal), "lines" (it is not) or "off" (`quiet`). Use it as a context
    manager, or call `close()`; `echo()` prints a message without breaking the bars.
    """

    def __init__(
        self,
        total: int | None,
        *,
        quiet: bool = False,
        item: str = "slide",
        inner: str = "tiles",
        stream: IO[str] | None = None,
        interval: float = HEARTBEAT_S,
        tty: bool | None = None,
        line_at_start: bool = False,
        desc: str | None = None,
        inner_unit: str | None = None,
    ) -> None:
        self.stream: IO[str] = stream if stream is not None else sys.stderr
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.mode = "off" if quiet else ("bars" if is_tty else "lines")
        self.total, self.item, self.inner_what, self.interval = total, item, inner, float(interval)
        self.line_at_start = line_at_start
        self.finished = 0
        self._lock = threading.RLock()
        self._current: tuple[int, str, float] | None = None  # (index, name, start time)
        self._units: tuple[int, int, str] | None = None  # (done, total, what) of the current item
        self._started = time.monotonic()
        self._last_line = self._started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outer: tqdm[Any] | None = None
        self._inner: tqdm[Any] | None = None
        if self.mode == "bars":
            self._outer = tqdm(total=total, desc=desc or f"{item}s", unit=item, file=self.stream, position=0,
                               dynamic_ncols=True)
            self._inner = tqdm(desc=inner, unit=inner_unit or inner.rstrip("s") or inner, file=self.stream,
                               position=1, leave=False, dynamic_ncols=True)
        elif self.mode == "lines":
            what = f"{total} {item}(s) to process" if total is not None else f"working on {item}s"
            self._line(f"{what}; a line per {'started' if line_at_start else 'finished'} {item} and at least "
                       f"one every {_duration(self.interval)}")
            self._thread = threading.Thread(target=self._heartbeat, name="equiseg-progress", daemon=True)
            self._thread.start()

    @property
    def current(self) -> str | None:
        """The name of the item in progress, None between items."""
        with self._lock:
            return None if self._current is None else self._current[1]

    # -- callbacks ------------------------------------------------------------------------------------------
    def start(self, index: int, name: str) -> None:
        """Item `index` (0-based) called `name` begins."""
        with self._lock:
            self._current = (index, name, time.monotonic())
            self._units = None
            if self._outer is not None and self._inner is not None:
                self._outer.set_postfix_str(name, refresh=True)
                self._inner.reset()
            elif self.mode == "lines" and self.line_at_start:
                self._line(f"{self._which(index, name)}: started ({self.finished} finished)")

    def units(self, done: int, total: int, what: str = "") -> None:
        """`done` of `total` units (tiles, segmentations) of the current item are finished."""
        with self._lock:
            self._units = (done, total, what or self.inner_what)
            if self._inner is not None:
                self._inner.total = total
                self._inner.n = done
                self._inner.refresh()

    def finish(self, index: int, name: str, outcome: str | None) -> None:
        """Item `index` is over; `outcome` says how ("done (3 regions, 12.0 s)", "failed: ..."); None: no line."""
        with self._lock:
            self.finished += 1
            self._current = None
            self._units = None
            if self._outer is not None:
                self._outer.update(1)
            elif self.mode == "lines" and outcome is not None:
                self._line(f"{self._which(index, name)}: {outcome}")

    def _which(self, index: int, name: str) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.item} {index + 1}{of}" + (f" {name}" if name else "")

    def echo(self, message: str) -> None:
        """A message to the stream that does not break the bars."""
        with self._lock:
            if self._outer is not None:
                tqdm.write(message, file=self.stream)
            else:
                self.stream.write(message + "\n")
                self.stream.flush()

    def close(self) -> None:
        """Stop the heartbeat and take the bars down: the inner one first (it is not kept), then the outer one,
        which leaves the cursor at the start of a fresh line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            if self._inner is not None:
                self._inner.close()
                self._inner = None
            if self._outer is not None:
                self._outer.close()
                self._outer = None
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lines mode -----------------------------------------------------------------------------------------
    def _line(self, text: str) -> None:
        with self._lock:
            self.stream.write(f"{_clock()} {text}\n")
            self.stream.flush()
            self._last_line = time.monotonic()

    def status(self) -> str:
        """What is going on now, in one line (the heartbeat's text)."""
        with self._lock:
            now = time.monotonic()
            done = f"{self.finished}{f'/{self.total}' if self.total is not None else ''} {self.item}(s) finished"
            if self._current is None:
                return f"{done}; working ({_duration(now - self._started)} since the start)"
            index, name, since = self._current
            parts = f"{self._units[0]}/{self._units[1]} {self._units[2]}, " if self._units else ""
            return f"{self._which(index, name)}: {parts}running for {_duration(now - since)} ({done})"

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            with self._lock:
                if time.monotonic() - self._last_line >= self.interval:
                    self._line(self.status())


def slide_outcome(result: Any) -> str:
    """How one slide ended, for its log line: a `SlideResult` (done, skipped or failed)."""
    status = getattr(result, "status", "")
    if status == "skipped":
        return "skipped (already complete)"
    if status == "failed":
        return f"failed: {getattr(result, 'error', '') or 'unknown error'}"
    regions = sum(is_measured(row) for row in getattr(result, "regions", []) or [])  # not missing TMA cores
    seconds = (getattr(result, "seconds", {}) or {}).get("total")
    took = f", {_duration(float(seconds))}" if seconds is not None else ""
    warned = len(getattr(result, "warnings", []) or [])
    return f"done ({regions} region(s){took}{f', {warned} warning(s)' if warned else ''})"


@contextmanager
def logs_through(progress: Progress) -> Iterator[None]:
    """Log records (library warnings) printed above the bars instead of through them, while bars are shown."""
    if progress.mode != "bars":
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield
