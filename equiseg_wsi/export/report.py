"""`OUT/report.html`: one self-contained page that shows a person what a run did, at a glance.

Everything comes from what the run wrote to disk (`manifest.json`, the slides' `biomarkers.csv` and
`<slide>_cores.csv`, the overlay and grid PNGs), so `write_report` also regenerates the page for an existing
output folder. The page is plain HTML and CSS (no script, nothing fetched from the network): pictures are
downscaled JPEG thumbnails embedded as base64 data URIs, charts are inline SVG drawn in the cluster colours
of the overlays and GeoJSON (`cluster_color`). It shows the run summary (inputs, options, model identity,
counts), a cluster legend, the failures with their causes, and per slide a thumbnail, the cluster fractions
of every region as stacked bars, for a TMA the grid of cores coloured by one biomarker column (missing and
failed cores marked as such), the overlays and the warnings.

This module assembles the page; the slides as read from disk are in `report_data`, the SVG charts in
`report_charts` and the embedded pictures in `report_images`.

Each bar segment carries `data-cluster` and `data-fraction` (the value in `biomarkers.csv`), each bar
`data-slide` and `data-region`, and each TMA grid cell `data-core`, `data-state` and `data-value`, so the
figures can be read back from the page.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from equiseg_wsi.export.atomic import atomic_write_text
from equiseg_wsi.export.geojson import cluster_class_name, cluster_color
from equiseg_wsi.export.report_charts import cluster_bars, tma_grid
from equiseg_wsi.export.report_data import Slide, esc, fraction_columns, hex_color, load_slide, number, present, short
from equiseg_wsi.export.report_images import THUMBNAIL_SIDE, figure, image_uri, overlay_figures, slide_thumbnail
from equiseg_wsi.threads import ordered_map

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BIOMARKER", "REPORT_NAME", "THUMBNAIL_SIDE", "report_html", "write_report"]

REPORT_NAME = "report.html"
#: The biomarker column the TMA grid is coloured by unless another is asked for.
DEFAULT_BIOMARKER = "c1_fraction"

MAX_EMBEDDED_SLIDES = 100  # slides past these link their pictures (relative paths) instead of embedding them
# slides drawn at once: decoding and shrinking their pictures (PIL, outside the GIL) is most of a report's time
REPORT_THREADS = 2
#: options and model entries shown without unfolding (by their last dotted name)
_KEY_OPTIONS = ("n_clusters", "clustering", "cluster_names", "target_mpp", "refine", "glass", "seed", "tma")
_KEY_MODEL = ("kind", "layer", "source", "kmeans_model")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;
color:#1d2330;font-size:14px;line-height:1.4}
main{max-width:1180px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:0 0 6px}h3{font-size:15px;margin:14px 0 6px}
section{background:#fff;border:1px solid #d9dce3;border-radius:6px;padding:14px 16px;margin:14px 0}
.sub{color:#5b6272}.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#5b6272;font-weight:600}tr+tr td{border-top:1px solid #eceef2}
.counts{display:flex;gap:10px;flex-wrap:wrap;margin:8px 0}
.count{border:1px solid #d9dce3;border-radius:6px;padding:6px 12px;min-width:70px;text-align:center}
.count b{display:block;font-size:20px}.count.bad{border-color:#c0392b;color:#c0392b}
.cols{display:flex;gap:28px;flex-wrap:wrap}.cols>div{min-width:300px}
.legend{display:flex;gap:14px;flex-wrap:wrap;margin:4px 0 8px}
.legend span{display:inline-flex;align-items:center;gap:5px}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #333;vertical-align:middle}
.gallery{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0}figure img{border:1px solid #e1e3e8}figcaption{font-size:12px;color:#5b6272}
img{display:block;max-width:100%;height:auto}
.status-done,.status-skipped{color:#1e7b34}.status-failed,.status-stopped{color:#c0392b;font-weight:600}
.error{color:#c0392b}.note{color:#8a5a00}
details{margin-top:8px}summary{cursor:pointer;color:#5b6272}
nav a{margin-right:10px;white-space:nowrap}a{color:#1f5fa8}
"""


def write_report(
    out_dir: str | os.PathLike[str], *, biomarker: str = DEFAULT_BIOMARKER, slide_thumbnails: bool = True
) -> Path:
    """Write `OUT/report.html` (atomically) from what the run in `out_dir` wrote, and return its path.

    `biomarker`: the `biomarkers.csv` column the TMA grids are coloured by. `slide_thumbnails`: show each slide
    that is not a TMA as read from its input (when that can still be opened), with its regions outlined; a TMA
    slide is shown by its `<slide>_grid.png`. Raises `FileNotFoundError` / `ValueError` when `out_dir` has no
    readable `manifest.json`; a picture or table that cannot be read becomes a note on the page instead."""
    folder = Path(out_dir)
    text = report_html(folder, biomarker=biomarker, slide_thumbnails=slide_thumbnails)
    return atomic_write_text(folder / REPORT_NAME, text, fsync=False)


def report_html(out_dir: str | os.PathLike[str], *, biomarker: str = DEFAULT_BIOMARKER,
                slide_thumbnails: bool = True) -> str:
    """The page `write_report` writes, as a string."""
    folder = Path(out_dir)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{folder / 'manifest.json'}: not a run manifest")
    slides = [load_slide(folder, s) for s in manifest.get("slides", []) if isinstance(s, dict)]
    for s in slides[MAX_EMBEDDED_SLIDES:]:
        s.embed = False
    k = _n_clusters(manifest, slides)
    names = _cluster_names(manifest, k)
    scale = _value_range(slides, biomarker)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>equiseg run report: {esc(folder.resolve().name)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        _summary(folder, manifest, slides),
        _legend_section(slides, k, names),
        _run_pictures(folder),
        _failures(manifest, slides),
    ]
    parts.extend(ordered_map(lambda s: _slide_section(folder, s, k, names, biomarker, scale, slide_thumbnails,
                                                      manifest), slides, REPORT_THREADS))
    parts.append("</main></body></html>\n")
    return "\n".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------------ reading


def _n_clusters(manifest: Mapping[str, Any], slides: Sequence[Slide]) -> int:
    k = max((max(fraction_columns(s.columns), default=0) for s in slides), default=0)
    if k == 0:
        k = int((manifest.get("options") or {}).get("segment", {}).get("n_clusters") or 0)
    return k


def _cluster_names(manifest: Mapping[str, Any], k: int) -> list[str]:
    """The run's cluster (QuPath class) names when the manifest records them, else "Cluster i"."""
    options = manifest.get("options") or {}
    given = options.get("cluster_names") or (options.get("segment") or {}).get("cluster_names")
    if isinstance(given, (list, tuple)) and len(given) >= k and all(isinstance(n, str) and n for n in given):
        return [str(n) for n in given[:k]]
    return [cluster_class_name(i + 1) for i in range(k)]


# ------------------------------------------------------------------------------------------------ pieces


def _summary(folder: Path, manifest: Mapping[str, Any], slides: Sequence[Slide]) -> str:
    status = [s.status for s in slides]
    regions = sum(present(r) for s in slides for r in s.rows)
    counts = [("slides", len(slides), False), ("done", status.count("done"), False),
              ("skipped", status.count("skipped"), False), ("failed", status.count("failed"), True),
              ("stopped", status.count("stopped"), True), ("regions", regions, False),
              ("failed regions", sum(len(s.failed_regions) for s in slides), True)]
    boxes = "".join(f'<div class="count{" bad" if bad and n else ""}" data-count="{esc(label)}"><b>{n}</b>'
                    f"{esc(label)}</div>" for label, n, bad in counts)
    total = sum(float(s.seconds.get("total") or 0.0) for s in slides)
    lines = [f"<section id=\"summary\"><h1>equiseg run report</h1><div class=\"sub\">{esc(folder.resolve())} · "
             f"{esc(manifest.get('tool', 'equiseg'))} {esc(manifest.get('version', '?'))} · "
             f"{total:.1f} s of slide processing</div>", f'<div class="counts">{boxes}</div>']
    if manifest.get("stopped"):
        lines.append(f'<p class="error">The run stopped early: {esc(manifest["stopped"])}.</p>')
    resume = manifest.get("resume") or {}
    if resume.get("redone"):
        why = ", ".join(f"{n} {r}" for r, n in (resume.get("redone_because") or {}).items() if n)
        lines.append(f"<p>{int(resume['redone'])} slide(s) redone ({esc(why)}).</p>")
    rows = "".join(
        f'<tr><td><a href="#slide-{esc(s.name)}">{esc(s.name)}</a></td><td class="mono">{esc(s.path)}</td>'
        f'<td class="status-{esc(s.status)}">{esc(s.status)}</td><td>{sum(present(r) for r in s.rows)}</td>'
        f"<td>{s.tissue_area_mm2:.2f}</td><td>{float(s.seconds.get('total') or 0):.1f}</td>"
        f"<td>{len(s.warnings)}</td></tr>" for s in slides)
    lines.append('<div class="cols"><div><h3>Inputs</h3><table><tr><th>slide</th><th>input</th><th>status</th>'
                 f"<th>regions</th><th>tissue mm²</th><th>s</th><th>warnings</th></tr>{rows}</table></div>")
    options = _flatten(manifest.get("options") or {})
    model = _flatten(manifest.get("model") or {})
    key = [(k, v) for k, v in options if k.split(".")[-1] in _KEY_OPTIONS]
    key += [(k, short(v, 24)) for k, v in model if k.split(".")[-1] in _KEY_MODEL]
    lines.append('<div><h3>Options and model</h3>' + _kv_table(key)
                 + f"<details><summary>all {len(options)} options</summary>{_kv_table(options)}</details>"
                 f"<details><summary>model identity ({len(model)} entries)</summary>{_kv_table(model)}</details>"
                 "</div></div></section>")
    return "\n".join(lines)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key in sorted(obj):
        value = obj[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out.append((name, ", ".join(str(v) for v in value)))
        else:
            out.append((name, "—" if value is None or value == {} else str(value)))
    return out


def _kv_table(items: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f'<tr><th>{esc(k)}</th><td class="mono">{esc(v)}</td></tr>' for k, v in items)
    return f"<table>{rows}</table>"


def _legend(k: int, names: Sequence[str]) -> str:
    items = "".join(f'<span><i class="sw" style="background:{hex_color(cluster_color(i))}"></i>{esc(names[i])}</span>'
                    for i in range(k))
    return f'<div class="legend">{items}</div>'


def _legend_section(slides: Sequence[Slide], k: int, names: Sequence[str]) -> str:
    """The cluster colours, each with the mean tissue colour of its cells and its share of all tissue."""
    if k == 0:
        return ""
    area = [0.0] * k
    colour = [[0.0, 0.0, 0.0] for _ in range(k)]
    for s in slides:
        for row in s.rows:
            for i in range(k):
                a = number(row.get(f"c{i + 1}_area_um2"))
                rgb = [number(row.get(f"c{i + 1}_mean_{c}")) for c in "rgb"]
                if a is None or a <= 0 or any(v is None for v in rgb):
                    continue
                area[i] += a
                for j, v in enumerate(rgb):
                    colour[i][j] += a * float(v or 0.0)
    total = sum(area)
    rows = []
    for i in range(k):
        mean = hex_color([round(c / area[i]) for c in colour[i]]) if area[i] else None
        seen = f'<i class="sw" style="background:{mean}"></i> {mean}' if mean else "—"
        share = f"{100 * area[i] / total:.1f} %" if total else "—"
        rows.append(f'<tr><td><i class="sw" style="background:{hex_color(cluster_color(i))}"></i> {esc(names[i])}</td>'
                    f"<td>{seen}</td><td>{share}</td></tr>")
    return ('<section id="clusters"><div class="cols"><div><h2>Clusters</h2><table><tr><th>cluster</th>'
            "<th>mean tissue colour</th><th>share of tissue</th></tr>" + "".join(rows) + "</table>"
            '<p class="sub">The first colour is the one of the overlays and of<br>the QuPath class; the second is '
            "the mean colour<br>of the slide under the cluster's cells.</p></div>"
            "<div><h2>Cluster fractions of every region</h2>"
            + cluster_bars(slides, k, names, overview=True) + "</div></div></section>")


def _run_pictures(folder: Path) -> str:
    """Pictures the run wrote at the top of OUT (such as a cluster key), each embedded."""
    figures = []
    for path in sorted(folder.glob("*.png")):
        uri, note = image_uri(path, 1100)
        figures.append(figure(uri, path.name, note))
    if not figures:
        return ""
    return ('<section id="run-pictures"><h2>Run pictures</h2><div class="gallery">' + "".join(figures)
            + "</div></section>")


def _failures(manifest: Mapping[str, Any], slides: Sequence[Slide]) -> str:
    items = [f'<li data-failed-slide="{esc(s.name)}"><b>{esc(s.name)}</b> ({esc(s.status)}): '
             f'<span class="error">{esc(s.error or "no cause recorded")}</span></li>'
             for s in slides if s.status in ("failed", "stopped")]
    items += [f'<li data-failed-region="{esc(s.name)}/{esc(region)}"><b>{esc(s.name)}</b> region {esc(region)}: '
              f'<span class="error">{esc(cause)}</span></li>'
              for s in slides for region, cause in s.failed_regions.items()]
    if not items:
        return '<section id="failures"><h2>Failures</h2><p>None: every slide and region was processed.</p></section>'
    return f'<section id="failures"><h2>Failures</h2><ul>{"".join(items)}</ul></section>'


def _slide_section(folder: Path, s: Slide, k: int, names: Sequence[str], biomarker: str,
                   scale: tuple[float, float] | None, thumbnails: bool, manifest: Mapping[str, Any]) -> str:
    out = [f'<section id="slide-{esc(s.name)}" data-slide="{esc(s.name)}"><h2>{esc(s.name)} '
           f'<span class="status-{esc(s.status)}">({esc(s.status)})</span></h2>',
           f'<div class="sub mono">{esc(s.path)}</div>']
    if s.error:
        out.append(f'<p class="error">{esc(s.error)}</p>')
    if s.status in ("done", "skipped"):
        try:
            out.append(_slide_body(folder, s, k, names, biomarker, scale, thumbnails, manifest))
        except Exception as exc:  # a report must not fail a run: what went wrong is shown instead
            log.debug("report: slide %s", s.name, exc_info=True)
            s.notes.append(f"this slide's part of the report could not be drawn ({type(exc).__name__}: {exc})")
    if s.warnings:
        lines = "".join(f"<li>{esc(w)}</li>" for w in s.warnings)
        out.append(f"<details><summary>{len(s.warnings)} warning(s)</summary><ul>{lines}</ul></details>")
    out.extend(f'<p class="note">{esc(n)}</p>' for n in s.notes)
    out.append("</section>")
    return "\n".join(out)


def _slide_body(folder: Path, s: Slide, k: int, names: Sequence[str], biomarker: str,
                scale: tuple[float, float] | None, thumbnails: bool, manifest: Mapping[str, Any]) -> str:
    """A TMA: its grid picture and the biomarker grid, the bars, then the cores' overlays. Another slide: its
    thumbnail beside its overlay(s), then the bars."""
    thumbnail = slide_thumbnail(folder, s, thumbnails, manifest)
    bars = "<h3>Cluster fractions</h3>" + _legend(k, names) + cluster_bars([s], k, names)
    if s.is_tma:
        return "\n".join([f'<div class="gallery">{thumbnail}{tma_grid(s, biomarker, scale)}</div>', bars,
                          "<h3>Overlays</h3>" + _legend(k, names) + overlay_figures(folder, s)])
    return "\n".join([f'<div class="gallery">{thumbnail}{overlay_figures(folder, s, inner=True)}</div>', bars])


def _value_range(slides: Sequence[Slide], column: str) -> tuple[float, float] | None:
    """Smallest and largest value of `column` over the present cores of every TMA in the run (one scale)."""
    values = [v for s in slides if s.is_tma for r in s.rows if present(r)
              if (v := number(r.get(column, ""))) is not None]
    return (min(values), max(values)) if values else None
