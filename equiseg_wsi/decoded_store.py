"""Decoded plain images kept for the rest of a run, so a large core JPEG is decoded once per level, not once per pass.

Why: a run reads each core image in its run-wide fit (tissue search, features), again in its segmentation (the
border refinement's pixels) and again for the report's thumbnail and the cluster key, each time through a new
reader. Decoding a Gleason-size core (5,200 px JPEG) takes 0.04-0.09 s per level, even at 1/4 or 1/8 size (the
whole file is entropy-decoded); the decoded pixels read back from the run's cache folder in 2-3 ms.

Only images of at least `STORE_MIN_PX` px are kept (a small tile decodes faster than its file is written). The
entries are raw `.npy` arrays keyed by the file (path, size, modification time) and level, in the folder given to
`keep_decoded`, which the run removes with its feature cache; a file that cannot be written or read is simply
decoded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["STORE_MIN_PX", "keep_decoded", "load", "save"]

STORE_MIN_PX = 4_000_000  # level-0 px of an image from which its decoded levels are kept

_folders: list[Path] = []  # where decoded images go during `keep_decoded` blocks (the innermost last)
_lock = threading.Lock()


@contextlib.contextmanager
def keep_decoded(folder: str | Path) -> Iterator[None]:
    """Within the block, large plain images decoded in this process are kept in `folder` for later readers."""
    with _lock:
        _folders.append(Path(folder))
    try:
        yield
    finally:
        with _lock:
            _folders.remove(Path(folder))


def _entry(path: Path, level: int, shape: tuple[int, ...], full_px: int) -> Path | None:
    """Where the decoded `level` of `path` is kept, or None when it is not to be kept (no block, small image)."""
    with _lock:
        folder = _folders[-1] if _folders else None
    if folder is None or full_px < STORE_MIN_PX:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{level}|{shape}"
    return folder / f"decoded-{hashlib.sha256(text.encode()).hexdigest()[:32]}.npy"


def load(path: Path, level: int, shape: tuple[int, int, int], full_px: int) -> np.ndarray | None:
    """The kept decoded `level` of `path` (RGB uint8 of `shape`), or None when none is kept."""
    entry = _entry(path, level, shape, full_px)
    if entry is None:
        return None
    try:
        arr = np.load(entry, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.shape == shape and arr.dtype == np.uint8 else None


def save(path: Path, level: int, arr: np.ndarray, full_px: int) -> None:
    """Keep the decoded `level` of `path` for later readers in this run (when a block is active)."""
    entry = _entry(path, level, arr.shape, full_px)
    if entry is None:
        return
    from equiseg_wsi.export.atomic import atomic_path

    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(entry, fsync=False) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
