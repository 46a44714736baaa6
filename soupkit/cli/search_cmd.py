"""``soupkit search``: a thin shell over ``soupkit.soups.merge_search.search`` (CMA-ES over a merge method's
parameters, scored by the evaluator). Nothing here imports torch at module level."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from soupkit.cli._app import app, require_files
from soupkit.cli.options import (
    CacheDir,
    EvalRecipe,
    NoCache,
    Output,
    Quiet,
    ReportDir,
    evaluator,
    generated_options,
    show_progress,
)
from soupkit.options import OutputOptions

SEARCH_PANEL = "Search"


@app.command(epilog="Examples:\n\n"
             "  soupkit search ft/*.safetensors -m ties --base zs.safetensors -e recipes/digits.yaml "
             "--budget 200 -o best.safetensors\n\n"
             "  soupkit search ft/*.safetensors -m task_arithmetic --base zs.safetensors -e R --per-layer "
             "-o best.safetensors\n\n"
             "  soupkit search ft/*.safetensors -m ties --base zs.safetensors -e R --search density "
             "--range density=0.1:0.9 --resume -o best.safetensors")
@generated_options(methods=True)
def search(
    checkpoints: Annotated[list[Path], typer.Argument(help="Input checkpoints (.safetensors, .pt, folders).",
                                                      show_default=False)],
    output: Output = ...,  # type: ignore[assignment]
    method: Annotated[str, typer.Option("--method", "-m", help="The merge method whose parameters are searched "
                                        "(soupkit methods lists them).")] = "linear",
    base: Annotated[Path | None, typer.Option(help="Base model for task-vector methods.", show_default=False)] = None,
    recipe: EvalRecipe = None,
    budget: Annotated[int, typer.Option(help="Candidates to score in all (the method's defaults first).",
                                        rich_help_panel=SEARCH_PANEL)] = 100,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="One value per layer group (layers.N, h.N, "
                                            "blocks.N, other modules).", rich_help_panel=SEARCH_PANEL)] = False,
    searched: Annotated[str | None, typer.Option("--search", help="Parameters to search, comma-separated "
                                                 "\\[default: every float one not given as a flag].",
                                                 show_default=False, rich_help_panel=SEARCH_PANEL)] = None,
    ranges: Annotated[list[str] | None, typer.Option("--range", help="NAME=LOW:HIGH, within the declared "
                                                     "bounds (repeatable).", show_default=False,
                                                     rich_help_panel=SEARCH_PANEL)] = None,
    population: Annotated[int | None, typer.Option(help="CMA-ES population per generation \\[default: "
                                                   "4 + 3 ln d].", show_default=False,
                                                   rich_help_panel=SEARCH_PANEL)] = None,
    seed: Annotated[int, typer.Option(help="CMA-ES seed.", rich_help_panel=SEARCH_PANEL)] = 0,
    no_early_stop: Annotated[bool, typer.Option("--no-early-stop", help="Score every candidate in full.",
                                                rich_help_panel=SEARCH_PANEL)] = False,
    no_compare: Annotated[bool, typer.Option("--no-compare", help="Skip the table of the best ingredient, "
                                             "uniform and greedy soups and defaults.",
                                             rich_help_panel=SEARCH_PANEL)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the search the output's log records.",
                                         rich_help_panel=SEARCH_PANEL)] = False,
    report_dir: ReportDir = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    options: OutputOptions | None = None,
    params: dict[str, Any] | None = None,
) -> None:
    """Search a merge method's parameters (per layer too) by CMA-ES, scored on the held-out set."""
    # lazy: the command's body loads the library (and torch); --help and argument errors stay quick
    from soupkit.errors import ParameterError
    from soupkit.merging.registry import get_method

    started = time.perf_counter()
    if recipe is None:
        raise ParameterError("soupkit search needs --eval RECIPE to score candidates")
    require_files(*checkpoints, base)
    get_method(method)  # a misspelt name answers before torch loads
    # lazy: the search module loads torch
    from soupkit.soups.merge_search import parse_ranges
    from soupkit.soups.merge_search import search as run_search

    names = [n.strip() for n in searched.split(",") if n.strip()] if searched is not None else None
    result = run_search(checkpoints, method, evaluator(recipe, no_cache=no_cache, cache_dir=cache_dir),
                        base=base, budget=budget, per_layer=per_layer, parameters=names,
                        ranges=parse_ranges(ranges or []), population=population, seed=seed,
                        early_stop=not no_early_stop, compare=not no_compare, output=output,
                        report_dir=report_dir, resume=resume, progress=show_progress(quiet), options=options,
                        **(params or {}))
    if not quiet:
        _report(result, started)


def _report(result: Any, started: float) -> None:
    """The comparison table on stdout; every file written, and the time, on stderr."""
    from rich.console import Console

    if result.table:
        result.print_table()
    console = Console(stderr=True, highlight=False)
    for path in [result.path, result.config_path, *result.report_files]:
        if path is not None:
            console.print(f"wrote [bold]{path}[/bold]")
    console.print(f"{result.stats['candidates']} candidates in {time.perf_counter() - started:.1f} s")
