"""CLI flags generated from their one declaration: ``OutputOptions`` fields and merge-method signatures.

``@generated_options(...)`` wraps a command function that takes ``options: OutputOptions`` (and, with
``methods=True``, ``params: dict``): the typer-visible signature gets one flag per output option and one per
method parameter of every registered method (built-ins and plugins), with help from the declarations. Values
are validated by the library (pydantic), so a flag and a library keyword argument give the same one-line error.
Also the flags several commands share (``-o``, ``-e/--eval``, ``--no-cache``, ``--cache-dir``, ``-q``), declared
once here. Torch-free.
"""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from soupkit.options import OutputOptions, flag

OUTPUT_PANEL = "Output options"
METHOD_PANEL = "Method parameters (see soupkit methods)"
EVAL_PANEL = "Evaluation"

#: text, not a Path: a trailing / is what names a folder output (Path drops it)
Output = Annotated[str, typer.Option("--output", "-o", help="Output checkpoint: .safetensors (shards with "
                                     "--shard-size), .pt, .ckpt, or a folder (ends with /); see docs/output.md.",
                                     metavar="PATH", show_default=False)]
EvalRecipe = Annotated[str | None, typer.Option("--eval", "-e", help="Evaluation recipe: a YAML path or a "
                                                "built-in name (digits, ...).", show_default=False,
                                                rich_help_panel=EVAL_PANEL)]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Score again even if the score cache has it.",
                                       rich_help_panel=EVAL_PANEL)]
CacheDir = Annotated[Path | None, typer.Option(help="Score cache folder \\[default: $SOUPKIT_CACHE_DIR or "
                                               "~/.cache/soupkit/scores].", show_default=False,
                                               rich_help_panel=EVAL_PANEL)]
ReportDir = Annotated[Path | None, typer.Option(help="Folder for the JSON report and plots, named after the "
                                                "output (soup.json, soup_steps.png; replaced only with --force) "
                                                "\\[default: next to the output].", show_default=False,
                                                rich_help_panel=EVAL_PANEL)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]


def show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def evaluator(recipe: str, *, no_cache: bool, cache_dir: Path | None) -> Any:
    """The evaluator a command's ``--eval``, ``--no-cache`` and ``--cache-dir`` describe (imports torch)."""
    # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
    from soupkit.eval import Evaluator

    return Evaluator.from_recipe(recipe, cache_dir=cache_dir, use_cache=not no_cache)


def _escape(text: str) -> str:
    return text.replace("[", "\\[")


def _output_parameters(skip: Iterable[str]) -> list[inspect.Parameter]:
    params = []
    for name, field in OutputOptions.model_fields.items():
        if name in skip:
            continue
        help_text = _escape(field.description or "")
        if field.annotation is bool:
            annotation: Any = Annotated[bool, typer.Option(flag(name), help=help_text, rich_help_panel=OUTPUT_PANEL)]
            default: Any = False
        elif name in ("include", "exclude"):
            annotation = Annotated[list[str] | None, typer.Option(flag(name), help=help_text, metavar="GLOB",
                                                                  show_default=False, rich_help_panel=OUTPUT_PANEL)]
            default = None
        else:
            metavar = {"dtype": "DTYPE", "device": "DEVICE", "shard_size": "SIZE", "rank": "R"}.get(name, "TEXT")
            annotation = Annotated[str | None, typer.Option(flag(name), help=help_text, metavar=metavar,
                                                            show_default=False, rich_help_panel=OUTPUT_PANEL)]
            default = None
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def _metavar(kind: type, per_model: bool, files: bool, choices: tuple[str, ...] = ()) -> str:
    one = "PATH" if files else "|".join(choices) if choices else {float: "X", int: "N", bool: "true|false",
                                                                     str: "TEXT"}[kind]
    return f"{one}[,{one}...]" if per_model else one


def method_flags() -> dict[str, dict[str, Any]]:
    """Every method parameter name -> its help (per method where methods describe or default it differently),
    metavar and the methods that take it (for the CLI and docs)."""
    # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
    from soupkit.merging.registry import METHODS
    from soupkit.report.methods import _default

    flags: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        for param in method.parameters.values():
            entry = flags.setdefault(param.name, {"groups": {}, "methods": [],
                                                  "metavar": _metavar(param.kind, param.per_model, bool(param.files),
                                                                      param.choices),
                                                  "aliases": [flag(param.name[:-1])] if param.files else []})
            default = None if param.required else _default(param.default)
            entry["groups"].setdefault(param.help, []).append((method.name, default))
            entry["methods"].append(method.name)
    for entry in flags.values():  # one sentence per distinct help text, naming its methods and their defaults
        entry["help"] = " ".join(f"{help_text} [{_defaults(users)}]".strip()
                                 for help_text, users in entry.pop("groups").items())
    return flags


def _defaults(users: list[tuple[str, str | None]]) -> str:
    """``ties, dare_ties; default 1`` when they agree, ``ties: 0.2, dare_ties: 1`` when not."""
    defaults = {d for _, d in users}
    if len(defaults) == 1:
        (default,) = defaults
        return ", ".join(n for n, _ in users) + (f"; default {default}" if default is not None else "")
    return ", ".join(f"{n}: {d if d is not None else 'required'}" for n, d in users)


def base_help() -> str:
    """The ``--base`` help, from the registry: the methods that take a base model."""
    from soupkit.merging.registry import METHODS  # lazy: methods register when a command is built

    takers = [m.name for m in METHODS if m.needs_base]
    return (f"Base model of the task-vector methods ({', '.join(takers)}); for LoRA adapters (any method) the "
            f"model they adapt.")


def _method_parameters() -> list[inspect.Parameter]:
    params = []
    for name, entry in sorted(method_flags().items()):
        option = typer.Option(flag(name), *entry["aliases"], help=_escape(entry["help"]), metavar=entry["metavar"],
                              show_default=False, rich_help_panel=METHOD_PANEL)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[str | None, option]))
    return params


def generated_options(*, methods: bool = False, skip: Iterable[str] = ()) -> Callable[[Callable[..., Any]],
                                                                                     Callable[..., Any]]:
    """Give a command the output-option flags (less ``skip``) and, with ``methods``, the method-parameter flags.

    The command receives ``options`` (a validated ``OutputOptions``) and ``params`` (method parameters given,
    as raw strings: the chosen method validates them)."""

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command).parameters.values() if p.name not in ("options", "params")]
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
        output_params = _output_parameters(skip)
        method_params = _method_parameters() if methods else []
        taken = {p.name for p in own}
        method_params = [p for p in method_params if p.name not in taken]
        output_names = {p.name for p in output_params}
        method_names = {p.name for p in method_params}

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in list(kwargs) if n in output_names}
            options = OutputOptions.build({n: v for n, v in given.items() if v not in (None, False, [])})
            params = {n: kwargs.pop(n) for n in list(kwargs) if n in method_names}
            extra = {"params": {n: v for n, v in params.items() if v is not None}} if methods else {}
            return command(**kwargs, options=options, **extra)

        parameters = [*own, *output_params, *method_params]
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return wrap
