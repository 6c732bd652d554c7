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
        _add_global_options(command)
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


class _Formatter(logging.Formatter):
    """The library's warnings read like the CLI's own ("Warning: ..."); everything else names its logger."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.WARNING and record.name.startswith("equiseg_wsi"):
            return f"Warning: {record.getMessage()}"
        return super().format(record)


def _configure_logging(verbose: int) -> None:
    """Root log level from the -v count (WARNING, INFO, DEBUG); the readers' own chatter only at -vv."""
    level = logging.WARNING - 10 * min(verbose, 2)
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(level)
    for noisy in ("tifffile", "tiffslide", "PIL"):  # readers log every oddity of a broken file; our error names it
        logging.getLogger(noisy).setLevel(logging.CRITICAL if verbose < 2 else logging.NOTSET)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(dict)["debug"] = True


def _add_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if value:
        obj = ctx.ensure_object(dict)
        obj["verbose"] = obj.get("verbose", 0) + value
        _configure_logging(obj["verbose"])


_DEBUG_HELP = "Show full Python tracebacks instead of one-line errors."
_VERBOSE_HELP = "More log output on stderr (-v info, -vv debug)."


def _add_global_options(command: click.Command) -> None:
    """--debug and -v also after the command name (`equiseg run --debug ...`), with the same effect as before it."""
    names = {opt for p in command.params for opt in getattr(p, "opts", [])}
    if "--debug" not in names:
        command.params.append(click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_debug,
                                           help=_DEBUG_HELP))
    if "--verbose" not in names and "-v" not in names:
        command.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False,
                                           callback=_add_verbose, help=_VERBOSE_HELP))


@click.group(cls=EquisegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="equiseg")
@click.option("--debug", is_flag=True, help=_DEBUG_HELP + " Also accepted after the command name.")
@click.option("-v", "--verbose", count=True, help=_VERBOSE_HELP + " Also accepted after the command name.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """equiseg: rotation-robust unsupervised segmentation of TMA cores and whole-slide images.

    Reads slides (SVS/TIFF/NDPI/MRXS/DICOM/... or plain JPEG/PNG cores), computes SRE-Conv features, clusters
    them with KMeans and writes QuPath GeoJSON, biomarker CSV tables, overlays and a run manifest.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["verbose"] = verbose
    _configure_logging(verbose)


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
