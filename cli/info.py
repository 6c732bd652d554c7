"""`equiseg info`: what a slide is, as the reader sees it."""

from __future__ import annotations

import json

import click

from equiseg_wsi.errors import EquisegError
from equiseg_wsi.slide import SlideInfo, open_slide

from .options import backend_option, mpp_option


def _format_block(info: SlideInfo) -> str:
    mpp = f"{info.mpp_x:.4f} x {info.mpp_y:.4f} µm/px ({info.mpp_source})" if info.mpp_x else "unknown"
    lines = [
        info.path,
        f"  backend:     {info.backend}",
        f"  vendor:      {info.vendor or '-'}",
        f"  size:        {info.width} x {info.height} px (level 0)",
        f"  resolution:  {mpp}",
        f"  levels:      {len(info.levels)}",
    ]
    for i, lv in enumerate(info.levels):
        lines.append(f"    [{i}] {lv.width} x {lv.height} px, downsample {lv.downsample:.4f}")
    lines.append(f"  bounds offset (QuPath crop): {info.bounds_offset[0]}, {info.bounds_offset[1]} px")
    lines.append(f"  associated images: {', '.join(info.associated_images) or '-'}")
    return "\n".join(lines)


@click.command()
@backend_option
@mpp_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per slide, one per line, instead of text.")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
def info(slides: tuple[str, ...], backend: str, mpp: float | None, as_json: bool) -> None:
    """Show size, pyramid levels, resolution (µm/px), vendor and QuPath bounds offset of each SLIDE.

    A SLIDE may be a DICOM WSI folder (or any one file of its series). A slide whose glass is far from
    neutral grey/white gets a warning on stderr naming the likely cause (e.g. YCbCr data labelled RGB).

    Unreadable files get a one-line error on stderr; the others are still reported; the exit code is 1 if
    any file failed.
    """
    failed = 0
    for path in slides:
        try:
            with open_slide(path, backend=backend, mpp=mpp) as slide:
                slide_info = slide.info()
                for warning in slide.check_glass():  # e.g. a glass colour far from neutral
                    click.echo(f"Warning: {warning}", err=True)
        except EquisegError as exc:
            failed += 1
            click.echo(f"Error: {exc}", err=True)
            continue
        if as_json:
            click.echo(json.dumps(slide_info.as_dict()))
        else:
            click.echo(_format_block(slide_info))
    if failed:
        raise SystemExit(1)
