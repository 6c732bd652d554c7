"""The one CSV writer of the library: rows of dicts as UTF-8 CSV, written atomically, the same bytes on every
run (``\\n`` line ends, minimal quoting, columns in a fixed order).

Text cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return, e.g. a slide named ``=cmd|' -C calc'!A0``) get a leading ``'``, as OWASP recommends for CSV
injection, and carriage returns inside text become spaces; numbers are written as they are.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from equiseg_wsi.export.atomic import atomic_write_text

__all__ = ["neutralise", "write_table"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """`text` as a spreadsheet shows it literally: a leading quote where it would start a formula, and carriage
    returns as spaces (the csv module leaves a lone CR unquoted, and readers take it for the end of the row)."""
    return ("'" + text if text.startswith(_FORMULA_START) else text).replace("\r", " ")


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
        writer.writerow([_cell(row[c], format_cell) if c in row else "" for c in cols])
    return atomic_write_text(path, buf.getvalue())


def _cell(value: Any, format_cell: Callable[[Any], str] | None) -> Any:
    if isinstance(value, str):
        return neutralise(value if format_cell is None else format_cell(value))
    return value if format_cell is None else format_cell(value)
