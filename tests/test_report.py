"""`OUT/report.html`: written by every run, self-contained, and its figures read back equal the run's files."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from equiseg_cli.main import cli
from equiseg_wsi.export import report as report_module
from equiseg_wsi.export.geojson import cluster_color
from equiseg_wsi.export.report import REPORT_NAME, write_report

REPO = Path(__file__).resolve().parents[1]
FAST = ["--target-mpp", "4", "--tile-size", "128", "--device", "cpu", "--quiet"]
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr", "area", "base", "col", "embed", "track",
        "rect", "circle", "line", "stop", "path"}  # the SVG ones are written self-closed (<rect .../>)


class Page(HTMLParser):
    """Every element with its attributes, and a check that elements nest and close properly."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k.replace("_", "-")) == v
                                                                  for k, v in attrs.items())]


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def bars(page: Page, overview: bool = False) -> dict[tuple[str, str], dict[str, object]]:
    """(slide, region) -> {"kind": bar class, "fractions": {cluster: (text, fill)}}, from the per-slide charts
    (or the overview chart), in page order."""
    out: dict[tuple[str, str], dict[str, object]] = {}
    svg_kind = None
    current: dict[str, object] | None = None
    for tag, a in page.elements:
        if tag == "svg":
            svg_kind = a.get("class")
        elif tag == "g" and "bar" in a.get("class", "").split() and svg_kind == ("bars overview" if overview
                                                                                     else "bars"):
            current = {"kind": a["class"], "fractions": {}}
            out[(a["data-slide"], a["data-region"])] = current
        elif tag == "rect" and "data-cluster" in a and current is not None and svg_kind is not None:
            fractions = current["fractions"]
            assert isinstance(fractions, dict)
            fractions[int(a["data-cluster"])] = (a["data-fraction"], a["fill"])
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One run: the 3 x 4 sample TMA (two cores missing), one core image, and a file that is no slide."""
    inputs = tmp_path_factory.mktemp("report_inputs")
    shutil.copy(REPO / "sample_data" / "tma" / "tma_3x4.svs", inputs)
    shutil.copy(REPO / "sample_data" / "cores" / "slide001_core001.jpg", inputs)
    (inputs / "manifest.csv").write_text("path,slide,core,mpp\nslide001_core001.jpg,slide001,core001,0.499\n"
                                         "broken.svs,broken,,0.5\n")
    (inputs / "broken.svs").write_bytes(b"II*\x00" + b"\x00not a slide" * 50)
    out = tmp_path_factory.mktemp("report_out")
    result = CliRunner().invoke(cli, ["run", str(inputs), "-o", str(out), *FAST, "--report-biomarker", "c2_fraction"])
    assert result.exit_code == 1, result.output  # the broken file fails; the others finish
    return out, result.output


def test_run_writes_a_valid_self_contained_report(run_out: tuple[Path, str]) -> None:
    out, _ = run_out
    path = out / REPORT_NAME
    assert path.is_file()
    assert path.stat().st_size < 5_000_000
    page = parse(path)
    assert page.problems == [] and page.stack == []
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text.lower()
    for tag, a in page.elements:  # nothing fetched from anywhere
        for key in ("src", "href"):
            value = a.get(key, "")
            assert not value.startswith(("http:", "https:", "//")), (tag, value)
            if key == "href" and value:
                assert value.startswith("#"), value
    manifest = json.loads((out / "manifest.json").read_text())
    sections = {a["data-slide"] for a in page.all("section") if "data-slide" in a}
    assert sections == {s["name"] for s in manifest["slides"]}
    counts = {a["data-count"]: a for a in page.all("div") if "data-count" in a}
    assert {"slides", "done", "failed", "skipped"} <= set(counts)


def test_failed_slide_is_named_with_its_cause(run_out: tuple[Path, str]) -> None:
    out, _ = run_out
    page = parse(out / REPORT_NAME)
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [s for s in manifest["slides"] if s["status"] == "failed"]
    assert [s["name"] for s in failed] == ["broken"]
    assert page.all("li", data_failed_slide="broken")
    text = " ".join("".join(page.text).split())
    assert " ".join(failed[0]["error"].split()) in text


def test_images_are_embedded_and_decodable(run_out: tuple[Path, str]) -> None:
    out, _ = run_out
    page = parse(out / REPORT_NAME)
    images = page.all("img")
    # TMA: grid picture + 10 core overlays; the core: thumbnail read from its input + overlay; the cluster key
    assert len(images) == 14
    for a in images:
        head, _, data = a["src"].partition(",")
        assert head == "data:image/jpeg;base64"
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as img:
            img.load()
            side = 1100 if a.get("alt") == "cluster_key.png" else report_module.THUMBNAIL_SIDE  # run pictures are wider
            assert img.format == "JPEG" and 0 < max(img.size) <= side


def test_bars_are_the_cluster_fractions_in_the_overlay_colours(run_out: tuple[Path, str]) -> None:
    out, _ = run_out
    page = parse(out / REPORT_NAME)
    found = bars(page)
    rows = read_rows(out / "biomarkers.csv")
    by_key = {("tma_3x4" if r["slide"] == "tma_3x4" else "slide001_core001", r["region"]): r for r in rows}
    assert set(found) == set(by_key)
    for key, bar in found.items():
        row = by_key[key]
        fractions = bar["fractions"]
        assert isinstance(fractions, dict)
        if row["present"] == "False":
            assert bar["kind"] == "bar missing" and not fractions, key
            continue
        assert sum(float(text) for text, _ in fractions.values()) == pytest.approx(1.0, abs=1e-9), key
        for cluster, (text, fill) in fractions.items():
            assert float(text) == pytest.approx(float(row[f"c{cluster}_fraction"]), abs=1e-12)
            assert fill == "#{:02x}{:02x}{:02x}".format(*cluster_color(cluster - 1))
    assert {k for k, b in found.items() if b["kind"] == "bar missing"} == {("tma_3x4", "A-2"), ("tma_3x4", "B-1")}
    assert set(bars(page, overview=True)) == set(found)  # the chart of every region at the top


def test_tma_grid_is_coloured_by_the_chosen_column(run_out: tuple[Path, str]) -> None:
    out, _ = run_out
    page = parse(out / REPORT_NAME)
    cells = {a["data-core"]: a for a in page.all("g") if a.get("class") == "core"}
    cores = read_rows(out / "tma_3x4" / "tma_3x4_cores.csv")
    assert set(cells) == {c["name"] for c in cores}
    rows = {r["region"]: r for r in read_rows(out / "tma_3x4" / "biomarkers.csv")}
    for name, cell in cells.items():
        if rows[name]["present"] == "False":
            assert cell["data-state"] == "missing" and cell["data-value"] == ""
        else:
            assert cell["data-state"] == "value"
            assert float(cell["data-value"]) == pytest.approx(float(rows[name]["c2_fraction"]))
    assert "TMA grid coloured by c2_fraction" in "".join(page.text)


def test_regenerated_for_an_existing_folder(run_out: tuple[Path, str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "copy"
    shutil.copytree(run_out[0], out)
    # a region that failed: no row, its cause in the manifest
    manifest = json.loads((out / "manifest.json").read_text())
    tma = next(s for s in manifest["slides"] if s["name"] == "tma_3x4")
    tma["failed_regions"] = {"C-4": "tma_3x4: region C-4: too few tissue cells for 3 clusters"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    table = out / "tma_3x4" / "biomarkers.csv"
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(line for line in lines if ",C-4," not in line))

    path = write_report(out, biomarker="no_such_column", slide_thumbnails=False)
    page = parse(path)
    text = " ".join("".join(page.text).split())
    assert "no such column in biomarkers.csv" in text
    assert "region C-4: too few tissue cells for 3 clusters" in text
    cells = {a["data-core"]: a["data-state"] for a in page.all("g") if a.get("class") == "core"}
    assert cells["C-4"] == "failed" and cells["A-2"] == "missing" and cells["A-1"] == "no value"
    assert bars(page)[("tma_3x4", "C-4")]["kind"] == "bar failed"
    assert len(page.all("img")) == 13  # no thumbnail read from the core's input this time (the key is still there)

    monkeypatch.setattr(report_module, "MAX_EMBEDDED_SLIDES", 0)  # past the limit: relative links
    page = parse(write_report(out))
    links = [a["src"] for a in page.all("img") if a.get("alt") != "cluster_key.png"]  # the run picture stays embedded
    assert links and all(not s.startswith("data:") and (out / s).is_file() for s in links)
