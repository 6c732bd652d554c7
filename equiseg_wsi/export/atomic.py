"""Atomic file writes: an interrupted run never leaves a half-written file under its final name.

Every writer in ``equiseg_wsi.export`` (GeoJSON, ``.qptma``, CSV, PNG, manifest) goes through this module so
that a resumable run (one that skips slides whose outputs exist) can trust that any output present under its
final name is complete.
The temporary file lives in the same folder as the target, because ``os.replace`` is only atomic within one
file system. Its name keeps the target's full name (and so its suffixes) at the end, e.g.
``.tmp-3f2a…-slide.geojson.gz``, so writers that pick a format from the suffix (Pillow) still work.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "remove_stale_temporaries", "temporary_name"]

_TMP_PREFIX = ".tmp-"


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """Return an unused temporary path next to ``path`` (hidden, unique, same suffixes)."""
    target = Path(path)
    token = f"{os.getpid()}-{secrets.token_hex(6)}"
    return target.with_name(f"{_TMP_PREFIX}{token}-{target.name}")


def _fsync_file(path: Path) -> None:
    """Flush a finished file to disk before the rename, so a crash cannot publish an empty file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only if the block succeeds.

    The yielded path does not exist yet: the caller creates it (any writer, any mode). On an exception the
    temporary file is removed and the exception propagates; the target keeps its previous content, if any.
    Parent folders are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{target}: the writer did not create the temporary file {tmp.name}")
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and return the final path."""
    target = Path(path)
    with atomic_path(target, fsync=False) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` atomically; newlines are written as given (no platform translation)."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files a killed run left in `folder` (not recursive); returns how many.

    Call it only where no other writer is active (a slide's folder before the slide is redone).
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    removed = 0
    for path in root.glob(f"{_TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed
