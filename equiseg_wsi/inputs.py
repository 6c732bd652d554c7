"""Turn what the user named (slide files, folders, CSV manifests) into a list of slides to process."""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from equiseg_wsi.cores import find_images, parse_core_name
from equiseg_wsi.errors import InputError
from equiseg_wsi.files import file_kind, size_text
from equiseg_wsi.slide import PLAIN_IMAGE_SUFFIXES, PLAUSIBLE_MPP, find_dicom_files, is_dicom, slide_key, slide_stem

MANIFEST_NAME = "manifest.csv"
PATH_COLUMNS = ("processed", "path")
# CSV inputs are small text files; the caps keep a wrong file (a slide or a log named .csv) from filling memory.
MAX_CSV_BYTES = 64 << 20
MAX_CSV_FIELD = 64 << 10  # per cell (a path or an id); checked before the csv module's cryptic 128 KiB limit


@dataclass(frozen=True)
class SlideSource:
    """One input file and what is known about it before opening it."""

    path: Path
    name: str  # unique output-folder name within the run
    slide: str  # slide id (Gleason `slide001`, else the file stem)
    core: str  # core id ('' for a whole slide)
    mpp: float | None  # µm/px from a manifest or the user; the file's own metadata wins when present
    case_id: str
    is_core: bool  # one image = one core (plain images, manifest rows naming a core)


def _float(value: str | None, where: str) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        number = float(value)
    except ValueError as exc:
        raise InputError(f"{where}: mpp {value!r} is not a number") from exc
    lo, hi = PLAUSIBLE_MPP
    if not lo <= number <= hi:  # also refuses nan and inf
        raise InputError(f"{where}: mpp {value!r} is outside {lo}..{hi} µm/px")
    return number


def _read_text(path: Path, what: str) -> str:
    """A small regular UTF-8 file's text; devices, FIFOs and folders are refused before being opened.

    `what` names the file in messages ("manifest"). Files over MAX_CSV_BYTES are refused, not read.
    """
    try:
        info = path.stat()  # follows symlinks: a link to /dev/zero is a character device
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: {what} is not a regular file ({file_kind(info.st_mode)})")
        if info.st_size > MAX_CSV_BYTES:
            raise InputError(f"{path}: {what} is larger than {size_text(MAX_CSV_BYTES)} ({size_text(info.st_size)})")
        # O_NONBLOCK: even a file swapped for a FIFO since the check cannot block the open
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise InputError(f"{path}: {what} is not a regular file ({file_kind(mode)})")
            data = fh.read(MAX_CSV_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    if len(data) > MAX_CSV_BYTES:  # it grew after the check
        raise InputError(f"{path}: {what} is larger than {size_text(MAX_CSV_BYTES)}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: cannot read {what} (not UTF-8 text: byte {exc.start} is invalid)") from exc


def _csv_rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of each non-empty CSV record, every cell at most MAX_CSV_FIELD characters."""
    reader = csv.reader(io.StringIO(_read_text(path, what), newline=""))
    too_long = f"a field is longer than {MAX_CSV_FIELD // 1024} KiB (is this really a {what}?)"
    rows = []
    try:
        for row in reader:
            if any(len(cell) > MAX_CSV_FIELD for cell in row):
                raise InputError(f"{path}, line {reader.line_num}: {too_long}")
            if row:
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        if "field limit" in str(exc):
            raise InputError(f"{path}, line {reader.line_num}: {too_long}") from None
        raise InputError(f"{path}, line {reader.line_num}: cannot read {what} ({exc})") from None
    return rows


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV manifest with a `processed` or `path` column; relative paths are taken from its folder."""
    records = _csv_rows(path, "manifest")
    columns = [c.strip() for c in records[0][1]] if records else []
    rows = []
    for line, cells in records[1:]:
        if any(cell.strip() for cell in cells[len(columns):]):
            raise InputError(f"{path}, line {line}: {len(cells)} fields, but the header names {len(columns)}")
        rows.append((line, {c: (cells[i].strip() if i < len(cells) else "") for i, c in enumerate(columns)}))
    column = next((c for c in PATH_COLUMNS if c in columns), None)
    if column is None:
        raise InputError(f"{path}: manifest needs a 'processed' or 'path' column (has: {', '.join(columns) or 'none'})")
    out = []
    for i, row in rows:
        if not row.get(column):
            raise InputError(f"{path}, line {i}: empty {column!r}")
        file = Path(row[column])
        if not file.is_absolute() and not (path.parent / file).resolve().is_relative_to(path.parent.resolve()):
            raise InputError(f"{path}, line {i}: relative path {row[column]!r} leads outside the manifest's folder "
                             "(write it as an absolute path if that is intended)")
        row["path"] = str(file if file.is_absolute() else (path.parent / file))
        row["_where"] = f"{path}, line {i}"
        out.append(row)
    _check_duplicates(path, out)
    return out


def _check_duplicates(path: Path, rows: list[dict[str, str]]) -> None:
    """A file listed twice must not get two resolutions (which one would win is arbitrary)."""
    first: dict[Path, dict[str, str]] = {}
    for row in rows:
        key = Path(row["path"]).resolve()
        seen = first.setdefault(key, row)
        if seen is not row and _float(seen.get("mpp"), seen["_where"]) != _float(row.get("mpp"), row["_where"]):
            raise InputError(f"{path}: {seen['_where'].rsplit(', ', 1)[1]} and {row['_where'].rsplit(', ', 1)[1]} "
                             f"list {Path(row['path']).name} with different mpp ({seen.get('mpp') or 'none'} and "
                             f"{row.get('mpp') or 'none'})")


def _source(path: Path, row: dict[str, str] | None, default_mpp: float | None) -> SlideSource:
    slide, core = parse_core_name(path)
    if is_dicom(path):  # a DICOM WSI is a series of files: it is named after its folder
        slide = slide_stem(path)
    where = row["_where"] if row else str(path)
    if row:
        slide = row.get("slide") or slide
        core = row.get("core") or core
    mpp = _float(row.get("mpp"), where) if row else None
    is_core = path.suffix.lower() in PLAIN_IMAGE_SUFFIXES or bool(row and row.get("core"))
    mpp = mpp if mpp is not None else default_mpp
    return SlideSource(path, path.stem, slide, core, mpp, (row or {}).get("case_id", ""), is_core)


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    mpp: float | None = None,
    exclude: str | os.PathLike[str] | None = None,
) -> list[SlideSource]:
    """Slides named directly, found in folders (recursively, with any manifest.csv there), or listed in CSVs.

    `mpp` (µm/px) is the fallback for files whose metadata and manifest row have none. Folders at or below
    `exclude` (the run's output folder) are not searched. A file named twice is processed once. Output names
    are file stems, made unique with a counter when two files share one.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[SlideSource] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir():
            found.extend(_from_folder(path, mpp, skip))
        elif path.suffix.lower() == ".csv":
            found.extend(_source(Path(r["path"]), r, mpp) for r in read_manifest(path))
        else:
            found.append(_source(path, None, mpp))
    return _unique(found)


def _from_folder(folder: Path, mpp: float | None, skip: Path | None) -> Iterable[SlideSource]:
    below = (d for d in folder.rglob("*") if d.is_dir())
    folders = [folder, *sorted(d for d in below if not any(p.startswith(".") for p in d.relative_to(folder).parts))]
    if skip is not None:
        folders = [d for d in folders if not d.resolve().is_relative_to(skip)]
    rows: dict[Path, dict[str, str]] = {}
    for d in folders:
        if os.path.lexists(d / MANIFEST_NAME):  # anything there is read or refused, never skipped
            for row in read_manifest(d / MANIFEST_NAME):
                rows[Path(row["path"]).resolve()] = row
    for d in folders:
        for image in [*find_images(d), *find_dicom_files(d)]:  # each DICOM series once: see _unique
            yield _source(image, rows.get(image.resolve()), mpp)


def output_stem(path: Path) -> str:
    """A file's preferred output-folder name: its name up to the first dot (`x` for x.ome.tiff); for a file of
    a DICOM WSI series, its folder's name."""
    return slide_stem(path) or "slide"


def _unique(found: list[SlideSource]) -> list[SlideSource]:
    seen: set[tuple[str, str]] = set()
    used: set[str] = set()
    out = []
    for source in found:
        path = source.path
        key = slide_key(path)  # the files of one DICOM series are one slide
        if key in seen:
            continue
        seen.add(key)
        stem = output_stem(path)
        name, n = stem, 1
        while name in used:  # a counter that is itself another file's stem is skipped (a.png after a-2.jpg)
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        out.append(replace(source, name=name))
    if not out:
        raise InputError("no slide or image files found in the inputs")
    return out


def mpp_by_file(path: str | os.PathLike[str]) -> dict[str, float]:
    """{file name: µm/px} from a manifest's `mpp` column (rows without a value are left out)."""
    manifest = Path(path)
    out = {}
    for row in read_manifest(manifest):
        mpp = _float(row.get("mpp"), row["_where"])
        if mpp is not None:
            out[Path(row["path"]).name] = mpp
    return out


# Header names (lower case) of the core-name and case-id columns of a case-id CSV.
_NAME_KEYS = ("core", "core name", "core_name", "name", "core id", "core_id")
_CASE_KEYS = ("case id", "case_id", "case", "unique id", "unique_id", "patient", "patient id", "patient_id")


def read_case_ids(path: str | os.PathLike[str]) -> dict[str, str]:
    """Core name -> case id from a CSV (header with a core-name and a case-id column, or two plain columns)."""
    target = Path(path)
    rows = [(n, r) for n, r in _csv_rows(target, "case ids file") if any(cell.strip() for cell in r)]
    if not rows:
        raise InputError(f"{target}: no rows (expected columns: core name, case id)")
    header = [h.strip().lower() for h in rows[0][1]]
    ni = next((header.index(k) for k in _NAME_KEYS if k in header), None)
    ci = next((header.index(k) for k in _CASE_KEYS if k in header), None)
    has_header = ni is not None or ci is not None
    if ni is None:
        ni = 0 if ci != 0 else 1
    if ci is None:
        ci = 1 if ni != 1 else 0
    if len(header) < 2:
        raise InputError(f"{target}: need two columns, core name and case id")
    if has_header:
        rows = rows[1:]
    out: dict[str, str] = {}
    for n, r in rows:
        if max(ni, ci) >= len(r):
            raise InputError(f"{target}:{n}: expected at least {max(ni, ci) + 1} columns")
        name, case = r[ni].strip(), r[ci].strip()
        if not name:
            continue
        if any(ch in case for ch in "\t\r\n"):
            raise InputError(f"{target}:{n}: case id {case!r} contains a tab or newline")
        if name in out and out[name] != case:
            raise InputError(f"{target}:{n}: core {name} has two case ids ({out[name]!r}, {case!r})")
        out[name] = case
    return out
