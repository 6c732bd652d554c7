"""Errors that say the output folder takes no more writes (a full disk, a quota, a read-only file system), told
apart from a bad input: such an error stops the run, since every later slide would fail the same way."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from equiseg_wsi.errors import one_line

__all__ = ["storage_cause", "storage_error", "storage_message"]

# errors that say the output folder takes no more writes, whatever file was being written
_STORAGE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, n))


def storage_error(exc: OSError, out_dir: Path) -> bool:
    """Whether `exc` says the output folder takes no more writes: a full disk, a quota, a read-only file
    system, or any error on a file inside the output folder (permissions changed mid-run, I/O errors)."""
    if exc.errno in _STORAGE_ERRNOS:
        return True
    for name in (exc.filename, exc.filename2):
        if isinstance(name, (str, os.PathLike)):
            try:
                if Path(name).resolve().is_relative_to(out_dir.resolve()):
                    return True
            except (OSError, RuntimeError):
                continue
    return False


def storage_message(out_dir: Path, exc: OSError) -> str:
    """One line naming the output folder and the cause (never the internal temporary file)."""
    return f"{out_dir}: cannot write outputs ({exc.strerror or one_line(exc)})"


def storage_cause(exc: BaseException, out_dir: Path) -> OSError | None:
    """The storage error behind `exc` (itself, or what it was raised from), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and storage_error(current, out_dir):
            return current
        current = current.__cause__ or current.__context__
    return None
