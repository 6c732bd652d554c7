"""The one CSV writer of the library: rows of dicts as UTF-8 CSV, written atomically, the same bytes on every
run (``\\n`` line ends, minimal quoting, columns in a fixed order)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from equiseg_wsi.export.atomic import atomic_write_text

__all__ = ["write_table"]


def _first_seen(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return list(keys)


def write_table(
    path: str | os.PathLike[str],
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    format_cell: Callable[[Any], str] | None = None,
) -> Path:
    """Write ``rows`` under a header of ``columns`` (default: every key, in first-seen order); returns the path.

    A key outside ``columns`` is left out and a missing one is an empty cell. ``format_cell`` gives the text of
    each present value; without it the csv module's own conversion applies (``str``, None as empty).
    """
    table = list(rows)
    cols = list(columns) if columns is not None else _first_seen(table)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in table:
        if format_cell is None:
            writer.writerow([row.get(c, "") for c in cols])
        else:
            writer.writerow([format_cell(row[c]) if c in row else "" for c in cols])
    return atomic_write_text(path, buf.getvalue())
