"""A test-only model of QuPath's ``.qptma`` import, written from its source and kept apart from the library's reader.

QuPath (``TMADataIO.importDearrayedTMAData``, 0.5.1 to the 0.8 development tree): skip lines until both
``TMA grid width:`` and ``TMA grid height:`` have been read; the next line is the tab-separated header and the
columns are looked up by name; ``X``, ``Y``, ``Width``, ``Height`` go through ``Double.parseDouble`` on every row;
``Present`` through ``Boolean.parseBoolean`` (``true`` in any case is present, anything else missing; no column
means all present); the case id comes from the column ``TMACoreObject.KEY_CASE_ID`` = ``"Case ID"`` (an empty
cell sets none); the grid is ``DefaultTMAGrid.create(cores, width)``: height = number of cores / width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KEY_CASE_ID = "Case ID"


def _java_double(text: str) -> float:
    """``Double.parseDouble``: surrounding whitespace allowed, an empty string or junk fails the import."""
    value = text.strip()
    if not value:
        raise ValueError("empty String")  # Java's NumberFormatException message
    return float(value)


def qupath_import(path: Path) -> dict[str, Any]:
    """What QuPath would build from the file: grid width/height and per-core lists (name, box, present, case id)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    width = height = -1
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("TMA grid width:"):
            width = int(line.replace("TMA grid width:", "").strip())
        elif line.startswith("TMA grid height:"):
            height = int(line.replace("TMA grid height:", "").strip())
        if width >= 0 and height >= 0:
            break
    assert width > 0 and height > 0, "QuPath: 'No grid dimensions available!'"
    header = lines[i].split("\t")
    rows = [line.split("\t") for line in lines[i + 1 :] if line]
    cols = {name: [r[k] if k < len(r) else "" for r in rows] for k, name in enumerate(header)}
    for key in ("X", "Y", "Width", "Height"):
        assert key in cols, "QuPath: 'No core locations available!'"
    n = len(cols["X"])
    present = cols.get("Present")
    ids = cols.get(KEY_CASE_ID)
    out: dict[str, Any] = {
        "width": width,
        "height": n // width,
        "declared_height": height,
        "name": cols.get("Core name", [None] * n),
        "box": [tuple(_java_double(cols[k][j]) for k in ("X", "Y", "Width", "Height")) for j in range(n)],
        "present": [True if present is None else present[j].lower() == "true" for j in range(n)],
        KEY_CASE_ID: [None if ids is None or not ids[j] else ids[j] for j in range(n)],
    }
    assert n % width == 0, "DefaultTMAGrid.create: cores do not fill whole rows"
    return out
