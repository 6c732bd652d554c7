"""QuPath's .qptma TMA grid format, core names, and the shared atomic-write helper."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from qupath_qptma import qupath_import

from equiseg_wsi.export.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from equiseg_wsi.export.qptma import (
    QPTMA_COLUMNS,
    QUPATH_ID_COLUMN,
    QptmaCore,
    QptmaError,
    expand_labels,
    qupath_core_name,
    read_qptma,
    write_qptma,
)


def grid_cores(width: int = 4, height: int = 3) -> list[dict]:
    """Row-major cores of a slightly irregular grid; every third position missing."""
    cores = []
    for r in range(height):
        for c in range(width):
            i = r * width + c
            cores.append(
                {
                    "name": qupath_core_name(r, c),
                    "x": 1000.0 + 1500.3 * c + 7.5 * r,
                    "y": 2000.0 + 1499.6 * r,
                    "width": 1200.4,
                    "height": 1199.5,
                    "present": i % 3 != 1,
                    "case_id": f"P{i:03d}" if i % 2 == 0 else "",
                }
            )
    return cores


# ----------------------------------------------------------------------------------------------- core names


def test_core_names_default_like_qupath() -> None:
    assert qupath_core_name(0, 0) == "A-1"
    assert qupath_core_name(7, 11) == "H-12"
    assert qupath_core_name(25, 0) == "Z-1" and qupath_core_name(26, 0) == "AA-1"
    assert qupath_core_name(1, 2, row_first=False) == "3-B"


def test_core_names_with_label_specs() -> None:
    assert qupath_core_name(2, 0, row_labels="1-12", col_labels="A-H") == "3-A"
    assert qupath_core_name(0, 1, col_labels="x,y,z") == "A-y"
    assert expand_labels("A-D", 4) == ["A", "B", "C", "D"]
    assert expand_labels("10-12", 3) == ["10", "11", "12"]
    assert expand_labels(["i", "ii"], 2) == ["i", "ii"]
    with pytest.raises(QptmaError):
        qupath_core_name(8, 0, row_labels="A-H")
    with pytest.raises(QptmaError):
        expand_labels("a,a", 2)
    with pytest.raises(QptmaError):
        qupath_core_name(-1, 0)


# ----------------------------------------------------------------------------------------------- .qptma file


def test_qptma_follows_the_format(tmp_path: Path) -> None:
    cores = grid_cores()
    path = write_qptma(tmp_path / "slide.qptma", cores, 4, 3)
    raw = path.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    lines = raw.decode("utf-8").split("\n")[:-1]
    assert lines[0] == "TMA grid width: 4"
    assert lines[1] == "TMA grid height: 3"
    assert lines[2] == "Core name\tX\tY\tWidth\tHeight\tPresent\tCase ID"
    assert lines[2].split("\t") == [*QPTMA_COLUMNS, QUPATH_ID_COLUMN]
    rows = [line.split("\t") for line in lines[3:]]
    assert len(rows) == 12, "one row per grid position"
    assert all(len(r) == 7 for r in rows), "tab separated, 7 fields"
    assert [r[0] for r in rows] == [f"{'ABC'[i // 4]}-{i % 4 + 1}" for i in range(12)], "row-major"
    assert {r[5] for r in rows} == {"true", "false"}
    for r, core in zip(rows, cores, strict=True):
        x, y, w, h = (int(v) for v in r[1:5])  # integers, as QuPath writes them
        assert x <= core["x"] and y <= core["y"]
        assert x + w >= core["x"] + core["width"] and y + h >= core["y"] + core["height"]
        assert x + w - (core["x"] + core["width"]) < 2
        assert r[5] == ("true" if core["present"] else "false")
        assert r[6] == core["case_id"]


def test_qupath_reads_case_ids_presence_and_grid(tmp_path: Path) -> None:
    """Read back as QuPath's importer does: case ids from 'Case ID', Present true/false, height = cores / width."""
    cores = grid_cores(4, 3)
    path = write_qptma(tmp_path / "slide.qptma", cores, 4, 3)
    grid = qupath_import(path)
    assert (grid["width"], grid["height"]) == (4, 3) == (grid["width"], grid["declared_height"])
    assert grid["name"] == [c["name"] for c in cores]
    assert grid["Case ID"] == [c["case_id"] or None for c in cores]
    assert grid["present"] == [c["present"] for c in cores]
    assert sum(grid["present"]) == 8 and not all(grid["present"])
    for (x, y, w, h), core in zip(grid["box"], cores, strict=True):  # every box parses, missing cores' too
        assert x <= core["x"] < x + w and y <= core["y"] < y + h and w >= core["width"] and h >= core["height"]


def test_reader_follows_qupath_present_and_height_rules(tmp_path: Path) -> None:
    """'TRUE' is present, '1'/'yes'/'' are missing; the height comes from the row count, not the header line."""
    text = (
        "TMA grid width: 2\nTMA grid height: 5\n"
        "Present\tCore name\tX\tY\tWidth\tHeight\tUnique ID\tCase ID\n"
        "TRUE\tA-1\t0\t0\t10\t10\tu1\tc1\n1\tA-2\t20\t0\t10\t10\tu2\t\n"
        "yes\tB-1\t0\t20\t10\t10\t\t\n\tB-2\t20\t20\t10\t10\t\tc4\n"
    )
    path = tmp_path / "q.qptma"
    path.write_text(text)
    grid = read_qptma(path)
    quoted = qupath_import(path)
    assert (grid.width, grid.height) == (quoted["width"], quoted["height"]) == (2, 2)
    assert [c.present for c in grid.cores] == quoted["present"] == [True, False, False, False]
    assert [c.case_id or None for c in grid.cores] == quoted["Case ID"] == ["c1", None, None, "c4"]
    assert [c.name for c in grid.cores] == quoted["name"]


def test_qptma_round_trip(tmp_path: Path) -> None:
    cores = grid_cores(6, 4)
    path = write_qptma(tmp_path / "g.qptma", cores, 6, 4)
    grid = read_qptma(path)
    assert (grid.width, grid.height) == (6, 4)
    assert [c.name for c in grid.cores] == [c["name"] for c in cores]
    assert [c.present for c in grid.cores] == [c["present"] for c in cores]
    assert [c.case_id for c in grid.cores] == [c["case_id"] for c in cores]
    assert grid.core(1, 2).name == "B-3"
    assert grid.core(3, 5).x == pytest.approx(np.floor(cores[23]["x"]))
    # Identical input, identical bytes.
    again = write_qptma(tmp_path / "h.qptma", cores, 6, 4)
    assert again.read_bytes() == path.read_bytes()


def test_objects_and_numpy_values_are_accepted(tmp_path: Path) -> None:
    @dataclass
    class Core:
        name: str
        x: float
        y: float
        width: float
        height: float
        present: bool

    cores = [Core("A-1", np.float32(1.5), 2, 3, 4, np.bool_(True)), QptmaCore("A-2", 10, 2, 3, 4, False, "c9")]
    grid = read_qptma(write_qptma(tmp_path / "o.qptma", cores, 2, 1))
    assert grid.cores[0] == QptmaCore("A-1", 1.0, 2.0, 4.0, 4.0, True, "")
    assert grid.cores[1].case_id == "c9"


def test_reader_skips_qupath_preamble_and_accepts_case_id_header(tmp_path: Path) -> None:
    text = (
        "/data/slide.svs\nslide.svs\n\n"
        "TMA grid width: 2\nTMA grid height: 1\n"
        "Core name\tX\tY\tWidth\tHeight\tPresent\tCase ID\n"
        "A-1\t0\t0\t10\t10\ttrue\tX1\nA-2\t20\t0\t10\t10\tfalse\n"
    )
    path = tmp_path / "q.qptma"
    path.write_text(text)
    grid = read_qptma(path)
    assert [c.case_id for c in grid.cores] == ["X1", ""]
    assert grid.cores[1].present is False


def test_custom_id_column_is_not_read_as_case_id(tmp_path: Path) -> None:
    """QuPath takes case ids from 'Case ID' only: another column name (the old 'Unique ID') carries none."""
    path = write_qptma(tmp_path / "c.qptma", grid_cores(2, 1), 2, 1, id_column="Unique ID")
    assert path.read_text().split("\n")[2].endswith("\tUnique ID")
    assert read_qptma(path).cores[0].case_id == ""
    assert qupath_import(path)["Case ID"] == [None, None]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda cs: cs.pop(), "one per position"),
        (lambda cs: cs[0].update(name="A\t1"), "tabs"),
        (lambda cs: cs[0].update(case_id="a\nb"), "newlines"),
        (lambda cs: cs[1].update(name=cs[0]["name"]), "twice"),
        (lambda cs: cs[0].update(x=float("nan")), "finite"),
        (lambda cs: cs[0].update(width=0), "> 0"),
        (lambda cs: cs[0].update(present="yes"), "True or False"),
        (lambda cs: cs[0].pop("y"), "'y'"),
        (lambda cs: cs[0].update(name=""), "empty"),
    ],
)
def test_bad_grids_are_refused(tmp_path: Path, change, match: str) -> None:
    cores = grid_cores(2, 2)
    change(cores)
    with pytest.raises(QptmaError, match=match):
        write_qptma(tmp_path / "bad.qptma", cores, 2, 2)
    assert list(tmp_path.iterdir()) == []


def test_bad_suffix_and_grid_size(tmp_path: Path) -> None:
    with pytest.raises(QptmaError, match=".qptma"):
        write_qptma(tmp_path / "g.txt", grid_cores(2, 1), 2, 1)
    with pytest.raises(QptmaError):
        write_qptma(tmp_path / "g.qptma", [], 0, 0)
    assert issubclass(QptmaError, ValueError)


# ---------------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_text(target, "two\n")
    assert target.read_bytes() == b"two\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_atomic_path_keeps_suffix_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "overlay.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith("overlay.png") and tmp != target
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old", "final name untouched until the block succeeds"
    assert target.read_bytes() == b"new"


def test_atomic_path_requires_the_file_to_be_written(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "never.txt"):
            pass
    assert list(tmp_path.iterdir()) == []
