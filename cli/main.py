"""The `equiseg` group: global flags and the one place where errors become one-line messages."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from equiseg_wsi import __version__, errors
from equiseg_wsi.errors import EquisegError

# name -> "module:attribute"; commands are imported only when used, so `equiseg --help` stays fast.
COMMANDS: dict[str, str] = {
    "dearray": "equiseg_cli.dearray:dearray",
    "fit": "equiseg_cli.fit:fit",
    "info": "equiseg_cli.info:info",
    "inter": "equiseg_cli.original:inter",
    "intra": "equiseg_cli.original:intra",
    "preprocess": "equiseg_cli.preprocess:preprocess",
    "pretrain": "equiseg_cli.pretrain:pretrain",
    "robustness": "equiseg_cli.robustness:robustness",
    "run": "equiseg_cli.run:run",
}


class EquisegGroup(click.Group):
    """Lazy subcommands, and errors shown as one line unless --debug."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # every failure becomes one line; --debug shows the traceback
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {one_line(exc)}", err=True)
            ctx.exit(2 if not isinstance(exc, EquisegError) else 1)


def one_line(exc: BaseException) -> str:
    """The exception as a single line; unexpected errors also name their type."""
    text = errors.one_line(exc)
    if isinstance(exc, EquisegError):
        return text
    return f"{exc.__class__.__name__}: {text} (run with --debug for the traceback)"


@click.group(cls=EquisegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="equiseg")
@click.option("--debug", is_flag=True, help="Show full Python tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """equiseg: rotation-robust unsupervised segmentation of TMA cores and whole-slide images.

    Reads slides (SVS/TIFF/NDPI/MRXS/... or plain JPEG/PNG cores), computes SRE-Conv features, clusters
    them with KMeans and writes QuPath GeoJSON, biomarker CSV tables, overlays and a run manifest.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:  # readers log every oddity of a broken file; our one-line error already names it
        for noisy in ("tifffile", "tiffslide", "PIL"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
