"""Slide folder names that stay with their input file for as long as the output folder lives.

`OUT/.equiseg-names.json` maps each input that ever ran into `OUT` (its resolved path; for a DICOM series, its
folder and series UID) to its folder name. A file seen before gets the same name again, whatever else is in
the run and in whatever order; a new file gets its stem, or the stem with a counter (`x-2`, `x-3`) when the
stem is taken by another file of this run or of an earlier one. Output folders made before this file existed
are read from their slides' records (`OUT/<name>/slide.json` names its input), so their names are kept too.
Call `stable_names` with the output folder locked (`equiseg_wsi.run_lock`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from equiseg_wsi.export.atomic import atomic_write_text
from equiseg_wsi.inputs import SlideSource, output_stem
from equiseg_wsi.slide import slide_key

__all__ = ["NAMES_FILE", "stable_names"]

NAMES_FILE = ".equiseg-names.json"
_RECORD = "slide.json"  # a slide's record in its folder (see equiseg_wsi.runner)


def _key(path: Path) -> str:
    """The registry's key of an input: its resolved path (for a DICOM series, its folder and series UID)."""
    where, series = slide_key(path)
    return f"{where}#{series}" if series else where


def _read_registry(out_dir: Path) -> dict[str, str]:
    """{resolved input path: folder name} of earlier runs; empty when there is none or it cannot be read."""
    try:
        data = json.loads((out_dir / NAMES_FILE).read_text(encoding="utf-8"))
        names = data["names"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}


def _recorded_names(out_dir: Path) -> dict[str, str]:
    """{resolved input path: folder name} from the slide records under `out_dir`."""
    out: dict[str, str] = {}
    try:
        folders = sorted(d for d in out_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return out
    for folder in folders:
        try:
            path = json.loads((folder / _RECORD).read_text(encoding="utf-8"))["path"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(path, str) and path:
            out.setdefault(_key(Path(path)), folder.name)
    return out


def stable_names(sources: Sequence[SlideSource], out_dir: str | os.PathLike[str]) -> list[SlideSource]:
    """`sources` with the folder names they have (or now get) in `out_dir`, remembered for later runs."""
    folder = Path(out_dir)
    registry = _read_registry(folder)
    if not registry:  # an older output folder (or a lost names file): the slides' records claim their names
        for path, name in _recorded_names(folder).items():
            if name.casefold() not in {n.casefold() for n in registry.values()}:
                registry[path] = name
    before = dict(registry)
    taken = {name.casefold() for name in registry.values()}  # case-insensitive: macOS and Windows folders
    keys = [_key(s.path) for s in sources]
    new = [i for i, key in enumerate(keys) if key not in registry]
    for i in new:  # first pass: a new file's own stem, while it is free
        stem = output_stem(sources[i].path)
        if stem.casefold() not in taken:
            registry[keys[i]] = stem
            taken.add(stem.casefold())
    for i in new:  # then counters for the stems already taken
        if keys[i] in registry:
            continue
        stem, n = output_stem(sources[i].path), 2
        while f"{stem}-{n}".casefold() in taken:
            n += 1
        registry[keys[i]] = f"{stem}-{n}"
        taken.add(registry[keys[i]].casefold())
    if registry != before or not (folder / NAMES_FILE).is_file():
        text = json.dumps({"names": dict(sorted(registry.items()))}, indent=1, ensure_ascii=False) + "\n"
        atomic_write_text(folder / NAMES_FILE, text)
    return [replace(s, name=registry[key]) for s, key in zip(sources, keys, strict=True)]
