"""Scratch folders for large intermediate files (a region's memory-mapped features), and their cleanup.

A run keeps its scratch in the output folder's temporary area, `OUT/.equiseg-tmp/` (see `scratch_area`): the
disk that must hold the results also holds the scratch, a full disk is reported against the output folder, and
nothing is left in the system's temporary folder. Each scratch folder is named after the host and the process
that made it (`equiseg-<host>-<pid>-<token>`) and is removed when its region is done; one left by a process
that was killed (SIGKILL, power loss) is removed by the next run on that host (`remove_stale_scratch`), and
only once its process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SCRATCH_AREA", "remove_stale_scratch", "scratch_area", "scratch_folder", "temporary_scratch"]

SCRATCH_AREA = ".equiseg-tmp"  # inside the output folder
_PREFIX = "equiseg-"


def _host() -> str:
    """This machine's name, reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname() or "host")[:64]


def scratch_area(out_dir: str | os.PathLike[str]) -> Path:
    """The output folder's temporary area (hidden; created only when a scratch file is needed)."""
    return Path(out_dir) / SCRATCH_AREA


def scratch_folder(parent: str | os.PathLike[str] | None, *, pid: int | None = None, host: str | None = None
                   ) -> Path:
    """A new, unused scratch folder path under `parent` (default: the system's temporary folder); not created."""
    root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    owner = f"{host if host is not None else _host()}-{pid if pid is not None else os.getpid()}"
    return root / f"{_PREFIX}{owner}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def temporary_scratch(parent: str | os.PathLike[str] | None) -> Iterator[Path]:
    """Yield a scratch folder path that the caller creates only if it needs one; removed on exit, whatever
    happened (an exception, KeyboardInterrupt or a stop signal)."""
    folder = scratch_folder(parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or no way to tell: keep its files
        return True
    return True


def remove_stale_scratch(parent: str | os.PathLike[str] | None) -> int:
    """Remove the scratch folders under `parent` that this host's dead processes left; returns how many.

    Folders of live processes, and of other hosts (whose processes cannot be checked from here), are kept;
    a run on that host removes them."""
    root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    pattern = re.compile(rf"{re.escape(_PREFIX)}{re.escape(_host())}-(\d+)-[0-9a-f]+")
    removed = 0
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += not entry.exists()
    return removed
