"""One run at a time per output folder.

`output_lock(OUT)` holds an exclusive advisory lock (`flock`) on `OUT/.equiseg-lock` for the whole run; a
second run on the same folder, on this machine or on another one that shares the folder over a file system
with working locks (local disks, NFSv4), fails at once with `OutputBusyError` naming the holder. The kernel
drops the lock when its process ends, however it ends (SIGKILL included), so a killed run never leaves a stale
lock behind. The lock file itself stays (removing it would race with a run that just opened it).
The lock is re-entrant within a process: the CLI takes it before any work and the runner takes it again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from equiseg_wsi.errors import InputError

__all__ = ["LOCK_NAME", "OutputBusyError", "output_lock"]

log = logging.getLogger(__name__)

LOCK_NAME = ".equiseg-lock"

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded against each other there
    fcntl = None  # type: ignore[assignment]


class OutputBusyError(InputError):
    """Another run is writing to this output folder."""


_held: dict[str, int] = {}  # output folder -> how many times this process holds its lock
_held_guard = threading.Lock()


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file ('pid 123 on host, since 12:00:00')."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(info['pid'])} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _acquire(path: Path) -> int | None:
    """An open descriptor of the locked lock file, or None where locks are not supported."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(f"{path.parent}: cannot write outputs here ({exc.strerror or exc})") from exc
    if fcntl is None:
        os.close(fd)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(fd)
            os.close(fd)
            raise OutputBusyError(
                f"{path.parent}: another equiseg run ({holder}) is writing to this output folder; wait for it to "
                "finish, or give another -o folder") from None
        os.close(fd)  # ENOLCK, EOPNOTSUPP: a file system without locks
        log.warning("%s: cannot lock the output folder (%s); concurrent runs are not detected", path.parent,
                    exc.strerror or exc)
        return None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(OSError):  # only informative: the lock is what counts
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    return fd


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold `out_dir`'s lock for the block (the folder is created); raises `OutputBusyError` at once when another
    run holds it, and `InputError` when the folder cannot be written."""
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot write outputs here ({exc.strerror or exc})") from exc
    key = str(folder.resolve())
    with _held_guard:
        if key in _held:
            _held[key] += 1
            fd: int | None = -1
        else:
            fd = _acquire(folder / LOCK_NAME)
            _held[key] = 1
    try:
        yield folder
    finally:
        with _held_guard:
            _held[key] -= 1
            if _held[key] == 0:
                del _held[key]
                if fd is not None and fd >= 0:
                    os.close(fd)  # closing the descriptor releases the flock
