"""Progress reporting without printing: the library calls a callback, the CLI draws the bar."""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[int, int, str], None]
"""Called with (done, total, what): `done` of `total` units of `what` (e.g. "tiles", "slides") are finished."""


def no_progress(done: int, total: int, what: str) -> None:
    """Default callback: report nothing."""
