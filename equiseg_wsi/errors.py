"""The project's exceptions: the CLI turns each into a one-line message naming the file and the cause."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from equiseg_wsi.slide_result import SlideResult


class EquisegError(Exception):
    """Base class for every error the library raises on purpose (bad input, not bugs)."""


class SlideError(EquisegError):
    """A slide or image cannot be opened or read."""


class MppUnknownError(SlideError):
    """The slide carries no resolution and the user gave none: never guess µm/px silently."""


class NoTissueError(EquisegError):
    """No tissue was found where some was required."""


class WeightsError(EquisegError):
    """A weights file is unreadable, unsafe, or does not fit the model."""


class ModelMismatchError(EquisegError):
    """A saved clustering model does not fit the features of this run."""


class InputError(EquisegError):
    """Bad user input that is not a slide: manifests, options, folders."""


class OutputWriteError(EquisegError):
    """The output folder takes no more writes (full disk, quota, read-only): the run stops.

    `result` is the slide that was being written when it happened (failed, with this message as its error); it
    crosses from a worker process with the error."""

    def __init__(self, message: str, result: SlideResult | None = None) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.result)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (manifests, failure tables, the CLI), or its type when it has none."""
    return " ".join(str(exc).split()) or exc.__class__.__name__
