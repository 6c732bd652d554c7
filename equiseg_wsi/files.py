"""What kind of file a path is, in words: inputs that are not regular files are refused by name."""

from __future__ import annotations

import stat

__all__ = ["file_kind", "size_text"]


def file_kind(mode: int) -> str:
    """"a directory", "a FIFO", ... for an ``st_mode`` that is not a regular file."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def size_text(n: int) -> str:
    """A byte count for messages: "64.0 MiB", or "812 bytes" below one MiB."""
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"
