"""Help that reads well at 80 columns: every option gets a plain metavar (``PATH``, ``X``, ``N``, nothing for a
flag) instead of typer's ``<list[Path]>`` / ``<bool>`` type labels, and docstring paragraphs are re-flowed so a
line break in the source never shows as a stray break in ``--help``."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

_METAVARS = {Path: "PATH", int: "N", float: "X", str: "TEXT"}


def _metavar(param: Any) -> str:
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    listed = typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args)
    core = annotation
    for candidate in [annotation, *args]:
        inner = typing.get_args(candidate) if typing.get_origin(candidate) is list else (candidate,)
        core = next((c for c in inner if c in _METAVARS), core)
    name = _METAVARS.get(core, "VALUE")
    return f"{name}..." if listed or getattr(param, "nargs", 1) != 1 else name


def _reflow(text: str | None) -> str | None:
    if not text:
        return text
    return "\n\n".join(re.sub(r"\s*\n\s*", " ", part.strip()) for part in text.split("\n\n"))


def tidy(command: Any) -> Any:
    """Set plain metavars and re-flow help texts on ``command`` and every subcommand (in place)."""
    command.help = _reflow(command.help)
    for param in getattr(command, "params", []):
        if param.param_type_name == "argument":
            shown = param.name.upper() + ("..." if param.nargs != 1 else "")
            param.metavar = shown
            param.display_type_rich = lambda ctx: None  # the name says it; no <list[Path]> beside it
            # usage line: ZEROSHOT, [CHECKPOINTS...] (typer writes {ZEROSHOT} and [CHECKPOINTS...]...)
            param._usage_display_name = (lambda s=shown, r=param.required: s if r else f"[{s}]")
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = _metavar(param)
    _plain_help_option(command)
    for sub in getattr(command, "commands", {}).values():
        tidy(sub)
    return command


def _plain_help_option(command: Any) -> None:
    make = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = make(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option
