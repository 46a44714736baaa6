"""``soupkit merge``, ``soupkit wise`` and ``soupkit methods``: thin shells over ``soupkit.merging`` and
``soupkit.soups``. Their method-parameter and output-option flags are generated (``soupkit.cli.options``).
Nothing here imports torch at module level."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from soupkit.cli._app import app, require_files
from soupkit.cli.options import (
    EVAL_PANEL,
    CacheDir,
    EvalRecipe,
    NoCache,
    Output,
    Quiet,
    ReportDir,
    base_help,
    evaluator,
    generated_options,
    show_progress,
)
from soupkit.options import OutputOptions
from soupkit.report.methods import SOUP_ALGORITHMS


def _summary(written: list[Any], started: float, quiet: bool) -> None:
    """One line per output the writers wrote: the path they returned (a file, a shard index, a folder) and the
    size of every file it is made of."""
    if quiet:
        return
    from rich.console import Console

    from soupkit.io.provenance import _files_of

    console = Console(stderr=True, highlight=False)
    for path in (Path(p) for p in written if p is not None):
        files = _files_of(path)
        size = sum(p.stat().st_size for p in files)
        shown = f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size / 1e3:,.1f} kB"
        parts = f", {len(files)} files" if len(files) > 1 else ""
        console.print(f"wrote [bold]{path}[/bold] ({shown}{parts}) in {time.perf_counter() - started:.1f} s",
                      soft_wrap=True)  # a path is never broken across lines: it stays copyable


@app.command(epilog="Examples:\n\n"
             "  soupkit merge ckpt/*.safetensors -o soup.safetensors\n\n"
             "  soupkit merge a.pt b.pt --method linear --weights 0.3,0.7 -o soup.safetensors\n\n"
             "  soupkit merge ft/*.safetensors -m ties --base zs.safetensors --density 0.2 -o ties.safetensors\n\n"
             "  soupkit merge -m greedy ckpt/*.safetensors -e recipes/digits.yaml -o soup.safetensors\n\n"
             "  soupkit merge --config recipes/merges/ties.yaml -o ties.safetensors")
@generated_options(methods=True)
def merge(
    checkpoints: Annotated[list[Path] | None, typer.Argument(help="Input checkpoints (.safetensors, .pt/.pth/.bin, "
                                                             "sharded index or folder).", show_default=False)] = None,
    output: Output = ...,  # type: ignore[assignment]
    method: Annotated[str | None, typer.Option("--method", "-m", help="A merge method (soupkit methods lists "
                                               "them) or a soup algorithm: greedy, learned (need --eval). "
                                               "\\[default: uniform, or linear with --weights]",
                                               show_default=False)] = None,
    base: Annotated[Path | None, typer.Option(help=base_help(), show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(help="A merge config YAML (method, base, models, parameters); "
                                                     "see recipes/merges/.", show_default=False)] = None,
    recipe: EvalRecipe = None,
    accept: Annotated[str, typer.Option(help="Greedy soup: accept a candidate that scores gt (strictly better) "
                                             "or ge (at least as well).", rich_help_panel=EVAL_PANEL)] = "gt",
    prescreen: Annotated[float | None, typer.Option(help="Greedy soup: skip ingredients whose own held-out "
                                                         "accuracy is below this.", show_default=False,
                                                    rich_help_panel=EVAL_PANEL)] = None,
    by_layer: Annotated[bool, typer.Option("--by-layer", help="Learned soup: one coefficient per ingredient "
                                                              "per tensor.", rich_help_panel=EVAL_PANEL)] = False,
    recalibrate_bn: Annotated[bool, typer.Option("--recalibrate-bn", help="Recompute BatchNorm statistics of "
                                                 "the merged model over the --eval recipe's held-out data.",
                                                 rich_help_panel=EVAL_PANEL)] = False,
    report_dir: ReportDir = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    options: OutputOptions | None = None,  # generated flags, validated
    params: dict[str, Any] | None = None,
) -> None:
    """Merge checkpoints into one: uniform soup by default, any registered method, or a greedy/learned soup."""
    from soupkit.errors import ParameterError

    started = time.perf_counter()
    if config is not None:
        if checkpoints:
            raise ParameterError("--config: give the models in the config file, not on the command line")
        from soupkit.merging.config import merge_from_config

        written = merge_from_config(config, output, options=options, progress=show_progress(quiet), **params)
        _summary([written], started, quiet)
        return
    if not checkpoints:
        raise ParameterError("give at least one input checkpoint (or --config)")
    require_files(*checkpoints, base)
    method = method or ("linear" if "weights" in params else "uniform")
    if method in SOUP_ALGORITHMS:
        _soup(method, checkpoints, output, recipe, options, params, started, quiet=quiet, accept=accept,
              prescreen=prescreen, by_layer=by_layer, report_dir=report_dir, no_cache=no_cache, cache_dir=cache_dir)
        return
    from soupkit.merging.registry import get_method

    get_method(method)  # a misspelt name answers before torch loads
    if recalibrate_bn and recipe is None:
        raise ParameterError("--recalibrate-bn needs --eval RECIPE (its held-out data recomputes the stats)")
    import soupkit

    recalibrate = evaluator(recipe, no_cache=no_cache, cache_dir=cache_dir) if recalibrate_bn else None
    written = soupkit.merge(checkpoints, method, output, base=base, options=options, recalibrate_bn=recalibrate,
                            progress=show_progress(quiet), **params)
    _summary([written], started, quiet)


def _soup(method: str, checkpoints: list[Path], output: str, recipe: str | None, options: OutputOptions,
          params: dict[str, Any], started: float, *, quiet: bool, report_dir: Path | None, no_cache: bool,
          cache_dir: Path | None, **algorithm: Any) -> None:
    """``merge --method greedy|learned``: one library call, with the evaluator the flags describe."""
    from soupkit.errors import ParameterError
    from soupkit.options import flag

    if recipe is None:
        raise ParameterError(f"--method {method} needs --eval RECIPE to score candidates")
    if params:
        raise ParameterError(f"{flag(next(iter(params)))} is a merge-method parameter; --method {method} chooses "
                             f"its own weights")
    import soupkit

    judge = evaluator(recipe, no_cache=no_cache, cache_dir=cache_dir)
    common = dict(output=output, report_dir=report_dir or Path(output).parent, progress=show_progress(quiet),
                  options=options)
    if method == "greedy":
        result = soupkit.greedy_soup(checkpoints, judge, accept=algorithm["accept"],
                                     prescreen=algorithm["prescreen"], **common)
    else:
        result = soupkit.learned_soup(checkpoints, judge, by_layer=algorithm["by_layer"], **common)
    if not quiet:
        result.print_table()
    _summary([result.path, *result.report_files], started, quiet)  # every file written, the report's too


@app.command(epilog="Examples:\n\n"
             "  soupkit wise zs.pt ft.pt --alpha 0.5 -o wise.safetensors\n\n"
             "  soupkit wise zs.pt ft.pt --alpha 0.3,0.5,0.7 -o wise.safetensors   "
             "# wise_alpha0.30.safetensors ...\n\n"
             "  soupkit wise zs.safetensors ft.safetensors --alpha 0:1:0.1 -e recipes/digits.yaml "
             "-o wise.safetensors")
@generated_options()
def wise(
    zeroshot: Annotated[Path, typer.Argument(help="The zero-shot (pre-trained) model.", show_default=False)],
    finetuned: Annotated[Path, typer.Argument(help="The fine-tuned model.", show_default=False)],
    output: Output = ...,  # type: ignore[assignment]
    alpha: Annotated[str, typer.Option(help="α, the fine-tuned model's weight: one value, a list 0.3,0.5,0.7 "
                                            "(one output each) or a range start:stop:step.")] = "0.5",
    recipe: EvalRecipe = None,
    select: Annotated[str | None, typer.Option(help="With --eval: choose α by this dataset's accuracy "
                                                    "\\[default: held-out].", show_default=False,
                                               rich_help_panel=EVAL_PANEL)] = None,
    fisher: Annotated[str | None, typer.Option(help="ZS_FISHER,FT_FISHER: Fisher-weighted interpolation "
                                                    "(with --eval).", show_default=False,
                                               rich_help_panel=EVAL_PANEL)] = None,
    fisher_floor: Annotated[float | None, typer.Option(help="Floor applied to Fisher values \\[default: the "
                                                            "fisher method's].", show_default=False,
                                                       rich_help_panel=EVAL_PANEL)] = None,
    report_dir: ReportDir = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    options: OutputOptions | None = None,
) -> None:
    """WiSE-FT: (1 - α)·zeroshot + α·finetuned. With --eval, sweep α, pick the best and plot the curve."""
    from soupkit.errors import ParameterError
    from soupkit.soups.alphas import parse_alphas

    started = time.perf_counter()
    alphas = parse_alphas(alpha)
    require_files(zeroshot, finetuned)
    fishers = tuple(p for p in fisher.split(",") if p) if fisher is not None else None
    if fishers is not None and len(fishers) != 2:
        raise ParameterError("--fisher: give two files, ZS_FISHER,FT_FISHER")
    import soupkit

    if recipe is not None:
        extra = {} if fisher_floor is None else {"fisher_floor": fisher_floor}
        result = soupkit.wise_sweep(zeroshot, finetuned, alphas, evaluator(recipe, no_cache=no_cache,
                                                                           cache_dir=cache_dir),
                                    select=select, output=output, fisher=fishers, options=options,
                                    report_dir=report_dir or Path(output).parent, progress=show_progress(quiet),
                                    **extra)
        if not quiet:
            result.print_table()
        _summary([result.path, *result.report_files], started, quiet)  # every file written, the report's too
        return
    if fishers is not None or fisher_floor is not None:
        raise ParameterError("--fisher needs --eval (the Fisher-weighted sweep scores each α)")
    single = len(alphas) == 1 and ("," not in alpha and ":" not in alpha)
    written = soupkit.wise_ft(zeroshot, finetuned, alphas[0] if single else alphas, output, options=options,
                              progress=show_progress(quiet))
    _summary(written if isinstance(written, list) else [written], started, quiet)


@app.command(epilog="Examples:\n\n  soupkit methods\n\n  soupkit methods ties")
def methods(
    name: Annotated[str | None, typer.Argument(help="One method to describe in full.", show_default=False)] = None,
) -> None:
    """List the merge methods (plugins included), their parameters and papers."""
    from soupkit.report.layout import console, print_table
    from soupkit.report.methods import method_table, method_text

    out = console()
    if name is not None:
        out.print(method_text(name), soft_wrap=True, highlight=False)
        return
    print_table(method_table(), out)
    out.print("soupkit methods NAME describes one; its parameters are flags of soupkit merge.", style="dim")
