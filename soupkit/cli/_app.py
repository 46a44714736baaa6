"""The Typer application object and the error handling every command shares.

Command modules (``merge_cmd``, ``inspect_cmd``, ``eval_cmd``, ...) register themselves on ``app``. They import
torch-dependent library code inside the command function, never at module level, so ``soupkit --help`` and
argument errors answer without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# re-exported: the parsers live in the torch-free library module the library itself uses
from soupkit._version import __version__
from soupkit.errors import CheckpointError
from soupkit.options_parse import parse_float_list, parse_size  # noqa: F401

app = typer.Typer(
    name="soupkit",
    help=(
        "Model soups and weight merging on checkpoint files: WiSE-FT, uniform / greedy / learned soups, "
        "task arithmetic, TIES, DARE, SLERP and more, streamed tensor by tensor and written atomically.\n\n"
        "Run [bold]soupkit demo[/bold] for the whole story on bundled data."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def require_files(*paths: Path | None) -> None:
    """Fail fast on an input path that does not exist, before the command imports torch (~3 s); the library
    raises the same one-line error where it opens the file."""
    for path in paths:
        try:
            missing = path is not None and not path.exists()
        except OSError as err:  # a name too long for the file system, a symlink loop
            raise CheckpointError(f"{path}: cannot read: {err.strerror}") from None
        if missing:
            raise CheckpointError(f"{path}: no such file")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"soupkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_print_version,
                                                help="Print the version and exit.")] = False) -> None:
    pass
