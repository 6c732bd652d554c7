"""QuPath's TMA grid text format (``.qptma``): how a dearrayed grid reaches QuPath.

QuPath's GeoJSON import drops ``tmaCore`` objects, so the grid travels as this small text file, dropped onto the
image in QuPath. The layout follows QuPath's own writer and reader
(``TMADataIO.writeTMAData`` / ``importDearrayedTMAData`` and ``TMAScoreImporter.readCSV``)::

    TMA grid width: 12
    TMA grid height: 8
    Core name<TAB>X<TAB>Y<TAB>Width<TAB>Height<TAB>Present<TAB>Case ID
    A-1<TAB>1024<TAB>2048<TAB>1500<TAB>1500<TAB>true<TAB>case-17
    ...                                  (one row per grid position, row-major)

Facts from QuPath's reader (0.5.1 to the 0.8 development tree) that shape the writer:

* The reader skips lines until it has both grid lines, then takes the next line as the tab-separated header
  and finds the columns by name: ``Core name``, ``X``, ``Y``, ``Width``, ``Height``, ``Present`` and the case id
  from the column ``TMACoreObject.KEY_CASE_ID`` = ``"Case ID"``. Any other column (e.g. ``Unique ID``, which
  earlier versions of this writer used) is ignored, so case ids must be in ``Case ID``.
* X/Y/Width/Height are parsed with ``Double.parseDouble`` for **every** row, missing cores included: a missing
  core must still carry its (expected) bounding box, or the import fails. QuPath writes integers
  (``(int) x``, ``(int) y``, ``ceil(width)``, ``ceil(height)``); so does this writer, widened so the integer
  box still contains the given one.
* ``Present`` is read with ``Boolean.parseBoolean``: ``true`` is present, anything else (``1``, ``yes``, empty)
  counts as missing; the writer writes ``true`` / ``false``.
* The grid height is taken as the number of core rows divided by the width (``DefaultTMAGrid.create``), not
  from the ``TMA grid height`` line: the writer writes exactly width x height rows.
* Core names follow QuPath's default: row letters, 1-based column numbers, ``A-1``.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from equiseg_wsi.errors import InputError
from equiseg_wsi.export.atomic import atomic_write_text

__all__ = [
    "QPTMA_COLUMNS",
    "QUPATH_ID_COLUMN",
    "QptmaCore",
    "QptmaError",
    "QptmaGrid",
    "expand_labels",
    "qptma_text",
    "qupath_core_name",
    "read_qptma",
    "write_qptma",
]

#: The column QuPath's ``.qptma`` reader takes the case id from (``TMACoreObject.KEY_CASE_ID``, QuPath >= 0.5.1).
QUPATH_ID_COLUMN = "Case ID"
#: Columns before the case id column, in QuPath's order.
QPTMA_COLUMNS = ("Core name", "X", "Y", "Width", "Height", "Present")


class QptmaError(InputError, ValueError):
    """A TMA grid that QuPath's ``.qptma`` reader would not accept, or an unreadable ``.qptma`` file."""


@dataclass(frozen=True)
class QptmaCore:
    """One grid position: name, level-0 bounding box (px), whether tissue is there, and its case id."""

    name: str
    x: float
    y: float
    width: float
    height: float
    present: bool
    case_id: str = ""


@dataclass(frozen=True)
class QptmaGrid:
    """A ``.qptma`` file's content: grid size and the cores in row-major order."""

    width: int
    height: int
    cores: tuple[QptmaCore, ...]

    def core(self, row: int, col: int) -> QptmaCore:
        """The core at (row, col), 0-based."""
        return self.cores[row * self.width + col]


# ----------------------------------------------------------------------------------------------------------
# Core names
# ----------------------------------------------------------------------------------------------------------


def _letters(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA (spreadsheet style) for grids taller than 26 rows."""
    out = ""
    index += 1
    while index > 0:
        index, rem = divmod(index - 1, 26)
        out = string.ascii_uppercase[rem] + out
    return out


def expand_labels(spec: str | Sequence[str] | None, n: int, *, default: str = "letters") -> list[str]:
    """Expand a label spec like QuPath's dearrayer: ``"A-H"``, ``"1-12"``, ``"a,b,c"`` or a list of labels.

    ``None`` gives the default: letters (A, B, ...) or numbers (1, 2, ...). Raises ``QptmaError`` if the
    spec yields fewer than ``n`` labels or has duplicates.
    """
    if n < 0:
        raise QptmaError(f"label count must be >= 0, got {n}")
    if spec is None:
        labels = [_letters(i) for i in range(n)] if default == "letters" else [str(i + 1) for i in range(n)]
    elif isinstance(spec, str):
        s = spec.strip()
        m_num = re.fullmatch(r"(\d+)\s*-\s*(\d+)", s)
        m_let = re.fullmatch(r"([A-Za-z])\s*-\s*([A-Za-z])", s)
        if m_num:
            a, b = int(m_num.group(1)), int(m_num.group(2))
            step = 1 if b >= a else -1
            labels = [str(i) for i in range(a, b + step, step)]
        elif m_let:
            a, b = ord(m_let.group(1)), ord(m_let.group(2))
            if m_let.group(1).isupper() != m_let.group(2).isupper():
                raise QptmaError(f"label range {spec!r} mixes upper and lower case")
            step = 1 if b >= a else -1
            labels = [chr(i) for i in range(a, b + step, step)]
        else:
            labels = [p.strip() for p in s.split(",") if p.strip()]
    else:
        labels = [str(p) for p in spec]
    if len(labels) < n:
        raise QptmaError(f"labels {spec!r} give {len(labels)} names, the grid needs {n}")
    labels = labels[:n]
    if len(set(labels)) != len(labels):
        raise QptmaError(f"labels {spec!r} contain duplicates")
    for lab in labels:
        if not lab or any(c in lab for c in "\t\r\n"):
            raise QptmaError(f"label {lab!r} must be non-empty without tabs or newlines")
    return labels


def qupath_core_name(
    row: int,
    col: int,
    row_labels: str | Sequence[str] | None = None,
    col_labels: str | Sequence[str] | None = None,
    *,
    row_first: bool = True,
) -> str:
    """QuPath-style core name of grid position (row, col), both 0-based: ``A-1`` by default.

    ``row_labels`` / ``col_labels`` take QuPath's dearrayer specs (``"A-H"``, ``"1-12"``, comma lists);
    ``row_first=False`` gives ``1-A``.
    """
    if row < 0 or col < 0:
        raise QptmaError(f"grid position must be >= 0, got row {row}, column {col}")
    r = expand_labels(row_labels, row + 1, default="letters")[row]
    c = expand_labels(col_labels, col + 1, default="numbers")[col]
    return f"{r}-{c}" if row_first else f"{c}-{r}"


# ----------------------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------------------


def _get(core: Any, key: str, default: Any = None, *, required: bool = True) -> Any:
    if isinstance(core, Mapping):
        if key in core:
            return core[key]
    elif hasattr(core, key):
        return getattr(core, key)
    if required:
        raise QptmaError(f"core {core!r} has no {key!r}")
    return default


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise QptmaError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _text(value: Any, what: str, *, allow_empty: bool) -> str:
    s = "" if value is None else str(value)
    if not s and not allow_empty:
        raise QptmaError(f"{what} must not be empty")
    if any(c in s for c in "\t\r\n"):
        raise QptmaError(f"{what} {s!r} must not contain tabs or newlines (QuPath splits on them)")
    return s


def qptma_text(cores: Sequence[Any], grid_width: int, grid_height: int, *, id_column: str = QUPATH_ID_COLUMN) -> str:
    """The exact text ``write_qptma`` writes (see the module docstring for the rules)."""
    if isinstance(grid_width, bool) or isinstance(grid_height, bool):
        raise QptmaError("grid width and height must be integers")
    if int(grid_width) != grid_width or int(grid_height) != grid_height or grid_width < 1 or grid_height < 1:
        raise QptmaError(f"grid must be at least 1 x 1, got {grid_width} x {grid_height}")
    gw, gh = int(grid_width), int(grid_height)
    cores = list(cores)
    if len(cores) != gw * gh:
        raise QptmaError(f"{len(cores)} cores given for a {gw} x {gh} grid: one per position, row-major")
    id_col = _text(id_column, "id column name", allow_empty=False)
    lines = [f"TMA grid width: {gw}", f"TMA grid height: {gh}", "\t".join((*QPTMA_COLUMNS, id_col))]
    names: set[str] = set()
    for i, core in enumerate(cores):
        where = f"core {i} (row {i // gw}, column {i % gw})"
        name = _text(_get(core, "name"), f"{where} name", allow_empty=False)
        if name in names:
            raise QptmaError(f"{where}: core name {name!r} is used twice")
        names.add(name)
        x = _finite(_get(core, "x"), f"{where} x")
        y = _finite(_get(core, "y"), f"{where} y")
        w = _finite(_get(core, "width"), f"{where} width")
        h = _finite(_get(core, "height"), f"{where} height")
        if w <= 0 or h <= 0:
            raise QptmaError(f"{where}: width and height must be > 0 (missing cores need their expected box)")
        present = _get(core, "present")
        if not isinstance(present, (bool, np.bool_)):
            raise QptmaError(f"{where}: present must be True or False, got {present!r}")
        case_id = _text(_get(core, "case_id", "", required=False), f"{where} case id", allow_empty=True)
        xi, yi = math.floor(x), math.floor(y)
        wi, hi = math.ceil(x + w) - xi, math.ceil(y + h) - yi
        flag = "true" if bool(present) else "false"
        lines.append(f"{name}\t{xi}\t{yi}\t{wi}\t{hi}\t{flag}\t{case_id}")
    return "\n".join(lines) + "\n"


def write_qptma(
    path: str | os.PathLike[str],
    cores: Sequence[Any],
    grid_width: int,
    grid_height: int,
    *,
    id_column: str = QUPATH_ID_COLUMN,
) -> Path:
    """Write a QuPath TMA grid file atomically and return its path.

    ``cores``: one per grid position, row-major, each a mapping or object with ``name``, ``x``, ``y``,
    ``width``, ``height`` (level-0 px bounding box; missing cores too), ``present`` (bool) and optionally
    ``case_id`` (str, may be empty). The file should end in ``.qptma`` (QuPath recognises it by that).
    """
    target = Path(path)
    if target.suffix.lower() != ".qptma":
        raise QptmaError(f"{target}: a QuPath TMA grid file must end in .qptma")
    text = qptma_text(cores, grid_width, grid_height, id_column=id_column)
    return atomic_write_text(target, text)


def _parse_number(value: str | None, what: str) -> float:
    try:
        return float(value) if value is not None else math.nan
    except ValueError as exc:
        raise QptmaError(f"{what}: {value!r} is not a number") from exc


def read_qptma(path: str | os.PathLike[str]) -> QptmaGrid:
    """Read a ``.qptma`` file the way QuPath's ``importDearrayedTMAData`` does (see the module docstring).

    Lines before the grid size are skipped; columns are found by name; the case id comes from ``Case ID`` only;
    ``Present`` is true only for ``true`` (any case, like ``Boolean.parseBoolean``), missing when the column is
    absent means present; the grid height is the number of core rows divided by the width.
    """
    target = Path(path)
    lines = target.read_text(encoding="utf-8").splitlines()
    width = height = None
    i = 0
    while i < len(lines) and (width is None or height is None):
        line = lines[i]
        try:
            if line.startswith("TMA grid width:"):
                width = int(line.split(":", 1)[1].strip())
            elif line.startswith("TMA grid height:"):
                height = int(line.split(":", 1)[1].strip())
        except ValueError as exc:
            raise QptmaError(f"{target}:{i + 1}: {line!r} has no integer grid size") from exc
        i += 1
    if not width or not height or width < 1 or height < 1:
        raise QptmaError(f"{target}: no 'TMA grid width/height' lines")
    if i >= len(lines):
        raise QptmaError(f"{target}: header line missing")
    header = lines[i].split("\t")
    for col in QPTMA_COLUMNS[1:5]:  # QuPath gives up without locations; name and Present are optional
        if col not in header:
            raise QptmaError(f"{target}: header has no {col!r} column")
    cores = []
    for n, line in enumerate(lines[i + 1 :], start=i + 2):
        if not line.strip():
            continue
        vals = line.split("\t")
        vals += [""] * (len(header) - len(vals))
        row = dict(zip(header, vals, strict=False))
        where = f"{target}:{n}"
        present = row.get("Present")
        cores.append(
            QptmaCore(
                name=row.get("Core name", ""),
                x=_parse_number(row["X"], where),
                y=_parse_number(row["Y"], where),
                width=_parse_number(row["Width"], where),
                height=_parse_number(row["Height"], where),
                present=True if present is None else present.lower() == "true",
                case_id=row.get(QUPATH_ID_COLUMN, ""),
            )
        )
    if not cores or len(cores) % width:
        raise QptmaError(f"{target}: {len(cores)} core rows do not fill rows of {width} (the grid width)")
    return QptmaGrid(width=width, height=len(cores) // width, cores=tuple(cores))
