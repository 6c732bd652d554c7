"""What made a slide's outputs, as digests stored in its `slide.json`: a resumed run skips a slide only when
the options, the model and the input are all the ones that made it, and redoes it otherwise.

- options: every `RunOptions` field except `overwrite` (how to run, not what comes out);
- model: the feature identity (architecture, normalisation, layer(s), µm/px, the weights file's sha256 or the
  random-init seed) and the applied cohort KMeans model's sha256; `--device` and `--batch-size` are left out;
- input: what is known about the slide before opening it (name, slide and core ids, mpp, case id) and the file:
  its sha256 up to `HASH_MAX_BYTES`, its size and modification time above (and, for MRXS, those of the files
  in its data folder).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from equiseg_wsi.errors import InputError
from equiseg_wsi.inputs import SlideSource
from equiseg_wsi.options import RunOptions

__all__ = ["HASH_MAX_BYTES", "REDO_REASONS", "changed_parts", "model_digest", "redo_summary", "run_key"]

HASH_MAX_BYTES = 256 << 20  # inputs up to this size are compared by content; larger slides by size and mtime
PARTS = ("options", "model", "input")
NO_KEY = "key"
REDO_REASONS = {"options": "options changed", "model": "model changed", "input": "input changed",
                NO_KEY: "no run key: older version"}


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=256)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """A regular file's sha256 (once per process and file version) when small, else its size and mtime."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size <= HASH_MAX_BYTES:
            return f"sha256:{_sha256(str(path), st.st_mtime_ns, st.st_size)}"
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns}"


def _data_folder(path: Path) -> list[str]:
    """Size and mtime of each file in an MRXS slide's data folder (its pixels live there)."""
    folder = path.with_suffix("")
    if path.suffix.lower() != ".mrxs" or not folder.is_dir():
        return []
    return [f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file()]


def options_digest(options: RunOptions) -> str:
    data = options.as_dict()
    data.pop("overwrite")
    return _digest(data)


def model_digest(identity: Mapping[str, Any], kmeans_model: str | None) -> str:
    """The feature model's identity and the cohort KMeans model file's content (None: KMeans per region)."""
    return _digest({"extractor": identity, "kmeans_model": None if kmeans_model is None else file_digest(kmeans_model)})


def input_digest(source: SlideSource) -> str:
    return _digest({"source": asdict(source), "file": file_digest(source.path), "data": _data_folder(source.path)})


def run_key(options: RunOptions, identity: Mapping[str, Any], kmeans_model: str | None,
            source: SlideSource) -> dict[str, str]:
    """The digests of what decides one slide's outputs, one per part of `PARTS`."""
    return {"options": options_digest(options), "model": model_digest(identity, kmeans_model),
            "input": input_digest(source)}


def changed_parts(stored: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """The parts whose digest differs (`[NO_KEY]` for a record written before run keys existed)."""
    if not stored:
        return [NO_KEY]
    return [part for part in PARTS if stored.get(part) != current.get(part)]


def redo_summary(redone: Iterable[Sequence[str]]) -> str:
    """'2 redone (options changed, input changed 1)' from each slide's changed parts; '' when none."""
    slides = [parts for parts in redone if parts]
    counts = Counter(part for parts in slides for part in parts)
    reasons = [REDO_REASONS[p] if counts[p] == len(slides) else f"{REDO_REASONS[p]} {counts[p]}"
               for p in (*PARTS, NO_KEY) if counts[p]]
    return f"{len(slides)} redone ({', '.join(reasons)})" if slides else ""
