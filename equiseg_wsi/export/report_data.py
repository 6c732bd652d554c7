"""The run folder as the report reads it (one `Slide` per manifest entry, with its tables), and the small
text helpers every part of the page uses."""

from __future__ import annotations

import csv
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Slide", "esc", "fraction_columns", "hex_color", "load_slide", "number", "present", "short"]

_FRACTION = re.compile(r"c([1-9][0-9]*)_fraction")


@dataclass
class Slide:
    """One slide of the manifest with what its folder holds."""

    name: str
    path: str
    status: str
    error: str | None
    outputs: list[str]
    warnings: list[str]
    failed_regions: dict[str, str]
    seconds: Mapping[str, Any]
    tissue_area_mm2: float
    rows: list[dict[str, str]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    cores: list[dict[str, str]] = field(default_factory=list)  # the TMA grid (`<slide>_cores.csv`), else []
    notes: list[str] = field(default_factory=list)  # what could not be read for the report
    embed: bool = True  # pictures embedded in the page; False: linked by relative path (see report.MAX_EMBEDDED_SLIDES)

    @property
    def is_tma(self) -> bool:
        return any(o.endswith("_cores.csv") for o in self.outputs)


def load_slide(folder: Path, entry: Mapping[str, Any]) -> Slide:
    slide = Slide(
        name=str(entry.get("name", "")), path=str(entry.get("path", "")), status=str(entry.get("status", "")),
        error=None if entry.get("error") is None else str(entry.get("error")),
        outputs=[str(o) for o in entry.get("outputs") or []], warnings=[str(w) for w in entry.get("warnings") or []],
        failed_regions={str(a): str(b) for a, b in (entry.get("failed_regions") or {}).items()},
        seconds=entry.get("seconds") or {}, tissue_area_mm2=float(entry.get("tissue_area_mm2") or 0.0),
    )
    table = f"{slide.name}/biomarkers.csv"
    if table in slide.outputs:
        try:
            slide.columns, slide.rows = _read_csv(folder / table)
        except (OSError, ValueError, csv.Error) as exc:
            slide.notes.append(f"{table}: cannot be read ({exc})")
    elif entry.get("regions"):  # no table on disk (an older run): the manifest has the same rows
        slide.rows = [{str(a): "" if b is None else str(b) for a, b in r.items()} for r in entry["regions"]]
        slide.columns = list(slide.rows[0])
    cores = next((o for o in slide.outputs if o.endswith("_cores.csv")), None)
    if cores is not None:
        try:
            slide.cores = _read_csv(folder / cores)[1]
        except (OSError, ValueError, csv.Error) as exc:
            slide.notes.append(f"{cores}: cannot be read ({exc})")
    return slide


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def number(text: object) -> float | None:
    try:
        value = float(str(text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def present(row: Mapping[str, str]) -> bool:
    return str(row.get("present", "True")) != "False"


def fraction_columns(columns: Iterable[str]) -> dict[int, str]:
    return {int(m.group(1)): c for c in columns if (m := _FRACTION.fullmatch(c))}


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def hex_color(color: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in color[:3]))


def short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
