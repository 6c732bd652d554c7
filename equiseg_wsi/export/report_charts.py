"""The report's inline-SVG charts: the stacked bars of each region's cluster fractions and the TMA grid of
cores coloured by one biomarker column (in viridis), both drawn in the cluster colours of the overlays."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from equiseg_wsi.export.geojson import cluster_color
from equiseg_wsi.export.report_data import Slide, esc, fraction_columns, hex_color, number, present, short

log = logging.getLogger(__name__)

__all__ = ["cluster_bars", "tma_grid"]

BAR_WIDTH = 460  # px of the stacked bar
BAR_LABEL = 120  # px left of the bar for the region name
BAR_ROW = 20
OVERVIEW_LABEL, OVERVIEW_BAR = 190, 360  # px: the chart of every region at the top
#: matplotlib's viridis at 0, 1/4, 1/2, 3/4, 1: a sequential scale that stays readable in grey and for
#: colour-blind readers, and does not reuse the cluster colours
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def cluster_bars(slides: Sequence[Slide], k: int, names: Sequence[str], *, overview: bool = False) -> str:
    """One horizontal stacked bar per region: the cluster fractions of its tissue, in the overlay colours.
    `overview`: the regions of every slide in one chart, labelled "slide region"."""
    label_w = OVERVIEW_LABEL if overview else BAR_LABEL
    bar_w = OVERVIEW_BAR if overview else BAR_WIDTH
    rows: list[str] = []
    y = 0

    def label(s: Slide, region: str) -> str:
        text = short(f"{s.name}  {region}", 38) if overview else region
        return f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{esc(text)}</text>'

    for s in slides:
        columns = fraction_columns(s.columns)
        listed = set()
        for row in s.rows:
            region = row.get("region", "")
            listed.add(region)
            head = f'data-slide="{esc(s.name)}" data-region="{esc(region)}">{label(s, region)}'
            if not present(row):
                rows.append(f'<g class="bar missing" {head}<rect x="{label_w}" y="{y + 2}" width="{bar_w}" '
                            f'height="{BAR_ROW - 4}" fill="#f0f0f0" stroke="#999" stroke-dasharray="4 3"/>'
                            f'<text x="{label_w + 8}" y="{y + 14}" fill="#666">missing core</text></g>')
                y += BAR_ROW
                continue
            segments = []
            cumulative = 0.0
            for i in range(1, k + 1):
                text = row.get(columns.get(i, ""), "")
                value = number(text)
                if value is None or value <= 0:
                    continue
                x0 = label_w + bar_w * cumulative
                cumulative += value
                x1 = label_w + bar_w * min(cumulative, 1.0)
                inside = (f'<text x="{(x0 + x1) / 2:.2f}" y="{y + 14}" text-anchor="middle" '
                          f'fill="{_ink(cluster_color(i - 1))}">{100 * value:.0f}</text>' if x1 - x0 >= 26 else "")
                segments.append(f'<rect data-cluster="{i}" data-fraction="{esc(text)}" x="{x0:.2f}" y="{y + 2}" '
                                f'width="{max(x1 - x0, 0):.2f}" height="{BAR_ROW - 4}" '
                                f'fill="{hex_color(cluster_color(i - 1))}"><title>{esc(s.name)} {esc(region)}: '
                                f"{esc(names[i - 1])} {100 * value:.1f} %</title></rect>{inside}")
            rows.append(f'<g class="bar" {head}' + "".join(segments) + "</g>")
            y += BAR_ROW
        for region, cause in s.failed_regions.items():
            if region in listed:
                continue
            rows.append(f'<g class="bar failed" data-slide="{esc(s.name)}" data-region="{esc(region)}">'
                        f'{label(s, region)}<text x="{label_w + 8}" y="{y + 14}" fill="#c0392b">failed: '
                        f"{esc(short(cause))}</text></g>")
            y += BAR_ROW
    if not rows:
        return '<p class="note">no regions</p>'
    axis = "".join(f'<line x1="{label_w + bar_w * t:.1f}" y1="0" x2="{label_w + bar_w * t:.1f}" '
                   f'y2="{y}" stroke="#ccc"/><text x="{label_w + bar_w * t:.1f}" y="{y + 13}" '
                   f'text-anchor="middle" fill="#666">{int(100 * t)} %</text>' for t in (0, 0.25, 0.5, 0.75, 1))
    width = label_w + bar_w + 20
    kind = "bars overview" if overview else "bars"
    return (f'<svg class="{kind}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 18}" '
            f'viewBox="0 0 {width} {y + 18}" font-size="12" font-family="sans-serif">{axis}{"".join(rows)}</svg>')


def _ink(color: Sequence[int]) -> str:
    """Black or white text, whichever reads better on `color`."""
    r, g, b = (int(c) for c in color[:3])
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _viridis(t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return (round(a[0] + f * (b[0] - a[0])), round(a[1] + f * (b[1] - a[1])), round(a[2] + f * (b[2] - a[2])))


def tma_grid(s: Slide, column: str, scale: tuple[float, float] | None) -> str:
    """The TMA's grid of cores, each coloured by `column` on the run's scale; missing and failed cores marked."""
    if not s.cores:
        return ""
    if column not in s.columns:
        numeric = [c for c in s.columns if s.rows and any(number(r.get(c, "")) is not None for r in s.rows)]
        s.notes.append(f"the TMA grid cannot be coloured by {column!r}: no such column in biomarkers.csv "
                       f"(columns with numbers: {', '.join(numeric[:12])}{', ...' if len(numeric) > 12 else ''})")
        log.warning("report: %s has no column %r; its TMA grid is drawn without values", s.name, column)
    rows_by_name = {r.get("region", ""): r for r in s.rows}
    cell, pad, top = 64, 10, 26
    try:
        n_rows = max(int(c["row"]) for c in s.cores)
        n_cols = max(int(c["column"]) for c in s.cores)
    except (KeyError, ValueError):
        return ""
    width, height = pad * 2 + 24 + n_cols * cell, top + 20 + n_rows * cell + 46
    parts = [f'<text x="{pad}" y="16" font-weight="600">{esc(column)}</text>']
    for c in range(n_cols):
        parts.append(f'<text x="{pad + 24 + c * cell + cell / 2}" y="{top + 12}" text-anchor="middle" '
                     f'fill="#666">{c + 1}</text>')
    for r in range(n_rows):
        parts.append(f'<text x="{pad + 8}" y="{top + 20 + r * cell + cell / 2 + 4}" text-anchor="middle" '
                     f'fill="#666">{esc(_row_letter(r))}</text>')
    for core in s.cores:
        try:
            r, c = int(core["row"]) - 1, int(core["column"]) - 1
        except (KeyError, ValueError):
            continue
        name = core.get("name", "")
        cx, cy, radius = pad + 24 + c * cell + cell / 2, top + 20 + r * cell + cell / 2, cell / 2 - 4
        row = rows_by_name.get(name)
        value = number(row.get(column, "")) if row is not None else None
        ink = "#666"
        if str(core.get("present", "True")) == "False" or (row is not None and not present(row)):
            state = "missing"
            shape = (f'<circle cx="{cx}" cy="{cy}" r="{radius}" fill="#fff" stroke="#999" stroke-dasharray="4 3"/>'
                     f'<text x="{cx}" y="{cy + 4}" text-anchor="middle" fill="#888">missing</text>')
        elif name in s.failed_regions:
            state = "failed"
            shape = (f'<circle cx="{cx}" cy="{cy}" r="{radius}" fill="#fbe9e7" stroke="#c0392b" stroke-width="2"/>'
                     f'<text x="{cx}" y="{cy + 4}" text-anchor="middle" fill="#c0392b">failed</text>')
        elif value is None or scale is None:
            state = "no value"
            shape = (f'<circle cx="{cx}" cy="{cy}" r="{radius}" fill="#eee" stroke="#666"/>'
                     f'<text x="{cx}" y="{cy + 4}" text-anchor="middle" fill="#666">—</text>')
        else:
            state = "value"
            lo, hi = scale
            fill = _viridis(0.5 if hi <= lo else (value - lo) / (hi - lo))
            ink = _ink(fill)
            shape = (f'<circle cx="{cx}" cy="{cy}" r="{radius}" fill="{hex_color(fill)}" stroke="#333"/>'
                     f'<text x="{cx}" y="{cy + 4}" text-anchor="middle" fill="{_ink(fill)}">{_fmt(value)}</text>')
        tip = f"{name}: {state if state != 'value' else _fmt(value or 0.0)}"
        if state == "failed":
            tip += f" ({s.failed_regions[name]})"
        parts.append(f'<g class="core" data-core="{esc(name)}" data-state="{state}" '
                     f'data-value="{"" if value is None else repr(value)}"><title>{esc(tip)}</title>{shape}'
                     f'<text x="{cx}" y="{cy - radius + 12}" text-anchor="middle" font-size="10" '
                     f'fill="{ink}">{esc(name)}</text></g>')
    if scale is not None:
        lo, hi = scale
        y0, bar_w = height - 36, min(width - 2 * pad, 240)
        stops = "".join(f'<stop offset="{i / 10:.1f}" stop-color="{hex_color(_viridis(i / 10))}"/>' for i in range(11))
        parts.append(f'<defs><linearGradient id="scale-{esc(s.name)}">{stops}</linearGradient></defs>'
                     f'<rect x="{pad}" y="{y0}" width="{bar_w}" height="10" fill="url(#scale-{esc(s.name)})" '
                     f'stroke="#666"/><text x="{pad}" y="{y0 + 24}" fill="#444">{_fmt(lo)}</text>'
                     f'<text x="{pad + bar_w}" y="{y0 + 24}" text-anchor="end" fill="#444">{_fmt(hi)}</text>'
                     f'<text x="{pad + bar_w / 2}" y="{y0 + 24}" text-anchor="middle" fill="#666">'
                     "all TMA cores of the run</text>")
    svg = (f'<svg class="tma-grid" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-size="11" font-family="sans-serif">{"".join(parts)}</svg>')
    return f"<figure>{svg}<figcaption>TMA grid coloured by {esc(column)}</figcaption></figure>"


def _row_letter(r: int) -> str:
    """A, B, ..., Z, AA, AB, ... like the core names."""
    out = ""
    r += 1
    while r:
        r, rem = divmod(r - 1, 26)
        out = chr(ord("A") + rem) + out
    return out
