"""Progress reporting without printing: the library calls a callback, the CLI draws the bar."""

from __future__ import annotations

from typing import Protocol


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int, what: str) -> None:
        """`done` of `total` units of `what` (e.g. "tiles", "slides") are finished."""


def no_progress(done: int, total: int, what: str) -> None:
    """Default callback: report nothing."""
