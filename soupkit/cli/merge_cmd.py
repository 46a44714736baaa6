"""``soupkit merge``, ``soupkit wise`` and ``soupkit methods``: thin shells over ``soupkit.merging`` and
``soupkit.soups``. Nothing here imports torch at module level."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from soupkit.cli._app import app, parse_float_list, parse_size, require_files

SOUP_ALGORITHMS = ("greedy", "learned")
#: the registry's built-in methods, named here so that help and a misspelt --method answer without torch (a test
#: keeps this in step with the registry)
BUILTIN_METHODS = ("uniform", "linear", "wise", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp",
                   "model_stock", "fisher")
_METHOD_LIST = ", ".join(BUILTIN_METHODS)

# Options shared by merge and wise: (name, help) pairs keep the two commands in step.
Output = Annotated[Path, typer.Option("--output", "-o", help="Output file (.safetensors, or .pt).", show_default=False)]
Dtype = Annotated[str | None, typer.Option(help="Output dtype for floating tensors: fp32, fp16 or bf16 "
                                                "\\[default: each tensor's input dtype].", show_default=False)]
Precise = Annotated[bool, typer.Option("--precise", help="Accumulate in float64 instead of float32.")]
Device = Annotated[str, typer.Option(help="Where the arithmetic runs: cpu, cuda, cuda:N or auto.")]
ShardSize = Annotated[str | None, typer.Option(help="Write Hugging Face-style shards of at most this size "
                                                    "(e.g. 5GB) plus an index.", show_default=False)]
AllowMissing = Annotated[bool, typer.Option("--allow-missing", help="Keep keys present in only some inputs "
                                                                    "(merged over the inputs that have them).")]
AllowNonfinite = Annotated[bool, typer.Option("--allow-nonfinite", help="Merge even if an input holds NaN/Inf.")]
Include = Annotated[list[str] | None, typer.Option(help="Merge only tensors matching this glob (repeatable); "
                                                       "others are copied from the first input.")]
Exclude = Annotated[list[str] | None, typer.Option(help="Do not merge tensors matching this glob (repeatable); "
                                                       "they are copied from the first input.")]
Ema = Annotated[bool, typer.Option("--ema", help="Read EMA weights (state_dict_ema / model_ema) from .pt inputs.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file (never an input).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
EvalRecipe = Annotated[str | None, typer.Option("--eval", help="Evaluation recipe (YAML path or built-in name) "
                                                              "for greedy/learned soups and α sweeps.",
                                                show_default=False)]
ReportDir = Annotated[Path | None, typer.Option(help="Folder for the JSON report and plots "
                                                     "\\[default: next to the output].", show_default=False)]


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _summary(paths: list[Path], started: float, quiet: bool) -> None:
    if quiet:
        return
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    for path in paths:
        size = sum(p.stat().st_size for p in _files_of(path))
        console.print(f"wrote [bold]{path}[/bold] ({size / 1e6:,.1f} MB) in {time.perf_counter() - started:.1f} s")


def _files_of(path: Path) -> list[Path]:
    from soupkit.io.provenance import _files_of as files

    return files(path)


@app.command(epilog="Examples:\n\n"
             "  soupkit merge ckpt/*.safetensors -o soup.safetensors\n\n"
             "  soupkit merge a.pt b.pt --method linear --weights 0.3,0.7 -o soup.safetensors\n\n"
             "  soupkit merge ft/*.safetensors --method ties --base zs.safetensors --density 0.2 "
             "-o ties.safetensors\n\n"
             "  soupkit merge --method greedy ckpt/*.safetensors --eval recipes/digits.yaml -o soup.safetensors\n\n"
             "  soupkit merge --config recipes/merges/ties.yaml -o ties.safetensors")
def merge(
    checkpoints: Annotated[list[Path] | None, typer.Argument(help="Input checkpoints (.safetensors, .pt/.pth/.bin, "
                                                             "sharded index or folder).", show_default=False)] = None,
    output: Output = ...,  # type: ignore[assignment]
    method: Annotated[str | None, typer.Option("--method", "-m", help=f"Merge method: {_METHOD_LIST}; or a "
                                               "soup algorithm needing --eval: greedy, learned. `soupkit methods` "
                                               "lists them. \\[default: uniform, or linear with --weights]",
                                               show_default=False)] = None,
    weights: Annotated[str | None, typer.Option(help="Per-model weights, comma-separated (linear, task "
                                                     "arithmetic, TIES, DARE, fisher).", show_default=False)] = None,
    base: Annotated[Path | None, typer.Option(help="Base model for task-vector methods (task_arithmetic, ties, "
                                                   "dare_*, model_stock).", show_default=False)] = None,
    scaling: Annotated[float | None, typer.Option(help="Task-vector scaling λ.", show_default=False)] = None,
    density: Annotated[float | None, typer.Option(help="Fraction of each task vector kept (TIES, DARE-TIES), in "
                                                       "(0, 1].", show_default=False)] = None,
    drop_rate: Annotated[float | None, typer.Option(help="DARE drop probability p, in [0, 1).",
                                                    show_default=False)] = None,
    t: Annotated[float | None, typer.Option("--t", help="SLERP interpolation factor in [0, 1].",
                                            show_default=False)] = None,
    alpha: Annotated[float | None, typer.Option(help="WiSE-FT α (method wise).", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for randomised methods (DARE).", show_default=False)] = None,
    fisher: Annotated[str | None, typer.Option(help="Comma-separated Fisher files, one per input (method fisher).",
                                               show_default=False)] = None,
    floor: Annotated[float | None, typer.Option(help="Fisher floor (method fisher).", show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(help="A merge config YAML (method, base, models, parameters); "
                                                     "see recipes/merges/.", show_default=False)] = None,
    evaluate: EvalRecipe = None,
    accept: Annotated[str, typer.Option(help="Greedy soup: accept a candidate that scores gt (strictly better) "
                                             "or ge (at least as good).")] = "gt",
    prescreen: Annotated[float | None, typer.Option(help="Greedy soup: skip ingredients whose own held-out "
                                                         "accuracy is below this.", show_default=False)] = None,
    by_layer: Annotated[bool, typer.Option("--by-layer", help="Learned soup: one coefficient per ingredient "
                                                              "per tensor.")] = False,
    report_dir: ReportDir = None,
    recalibrate_bn: Annotated[bool, typer.Option("--recalibrate-bn", help="Recompute BatchNorm statistics of "
                                                 "the merged model over the --eval recipe's held-out data.")
                              ] = False,
    dtype: Dtype = None,
    precise: Precise = False,
    device: Device = "cpu",
    shard_size: ShardSize = None,
    allow_missing: AllowMissing = False,
    allow_nonfinite: AllowNonfinite = False,
    include: Include = None,
    exclude: Exclude = None,
    ema: Ema = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Merge checkpoints into one: uniform soup by default, any registered method, or a greedy/learned soup."""
    from soupkit.errors import ParameterError

    started = time.perf_counter()
    engine = dict(dtype=dtype, precise=precise, device=device, allow_missing=allow_missing,
                  allow_nonfinite=allow_nonfinite, include=include or (), exclude=exclude or (), ema=ema,
                  force=force, progress=_show_progress(quiet),
                  shard_size=parse_size(shard_size, "--shard-size") if shard_size else None)
    if config is not None:
        if checkpoints:
            raise ParameterError("--config: give the models in the config file, not on the command line")
        from soupkit.merging.config import merge_from_config

        written = merge_from_config(config, output, **engine)
        _summary([Path(written)], started, quiet)
        return
    if not checkpoints:
        raise ParameterError("give at least one input checkpoint (or --config)")
    require_files(*checkpoints, base)
    if method is None:
        method = "linear" if weights is not None else "uniform"
    if method not in BUILTIN_METHODS + SOUP_ALGORITHMS and "soupkit.merging.registry" not in sys.modules:
        # nothing can have registered another method yet (that needs the registry): answer before torch loads
        from soupkit.errors import unknown_choice

        raise ParameterError(unknown_choice("merge method", method, BUILTIN_METHODS + SOUP_ALGORITHMS))
    if method in SOUP_ALGORITHMS:
        if evaluate is None:
            raise ParameterError(f"--method {method} needs --eval RECIPE to score candidates")
        import soupkit

        if method == "greedy":
            result = soupkit.greedy_soup(checkpoints, evaluate, accept=accept, prescreen=prescreen, output=output,
                                         force=force, report_dir=report_dir or output.parent,
                                         progress=_show_progress(quiet))
        else:
            result = soupkit.learned_soup(checkpoints, evaluate, by_layer=by_layer, output=output, force=force,
                                          report_dir=report_dir or output.parent, progress=_show_progress(quiet))
        if not quiet:
            result.print_table()
        _summary([output], started, quiet)
        return
    params: dict[str, object] = {"scaling": scaling, "density": density, "drop_rate": drop_rate, "t": t,
                                 "alpha": alpha, "seed": seed, "floor": floor}
    params = {k: v for k, v in params.items() if v is not None}
    if weights is not None:
        params["weights"] = parse_float_list(weights, "--weights")
    if fisher is not None:
        params["fishers"] = [p for p in fisher.split(",") if p]
    if recalibrate_bn:
        if evaluate is None:
            raise ParameterError("--recalibrate-bn needs --eval RECIPE (its held-out data recomputes the stats)")
        params["recalibrate_bn"] = evaluate
    import soupkit

    written = soupkit.merge(checkpoints, method, output, base=base, **params, **engine)
    _summary([Path(written)], started, quiet)


@app.command(epilog="Examples:\n\n"
             "  soupkit wise zs.pt ft.pt --alpha 0.5 -o wise.safetensors\n\n"
             "  soupkit wise zs.pt ft.pt --alpha 0.3,0.5,0.7 -o wise.safetensors   "
             "# wise_alpha0.30.safetensors ...\n\n"
             "  soupkit wise zs.safetensors ft.safetensors --alpha 0:1:0.1 --eval recipes/digits.yaml "
             "-o wise.safetensors")
def wise(
    zeroshot: Annotated[Path, typer.Argument(help="The zero-shot (pre-trained) model.", show_default=False)],
    finetuned: Annotated[Path, typer.Argument(help="The fine-tuned model.", show_default=False)],
    output: Output = ...,  # type: ignore[assignment]
    alpha: Annotated[str, typer.Option(help="α (weight of the fine-tuned model): one value, a list 0.3,0.5,0.7 "
                                            "(one output each) or a range start:stop:step.")] = "0.5",
    evaluate: EvalRecipe = None,
    select: Annotated[str | None, typer.Option(help="With --eval: choose α by this dataset's accuracy "
                                                    "\\[default: held-out].", show_default=False)] = None,
    fisher: Annotated[str | None, typer.Option(help="ZS_FISHER,FT_FISHER: Fisher-weighted interpolation "
                                                    "(with --eval).", show_default=False)] = None,
    fisher_floor: Annotated[float, typer.Option(help="Floor applied to Fisher values.")] = 1e-8,
    report_dir: ReportDir = None,
    dtype: Dtype = None,
    precise: Precise = False,
    device: Device = "cpu",
    shard_size: ShardSize = None,
    allow_nonfinite: AllowNonfinite = False,
    ema: Ema = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """WiSE-FT: (1 - α)·zeroshot + α·finetuned. With --eval, sweep α, pick the best and plot the curve."""
    from soupkit.errors import ParameterError
    from soupkit.soups.alphas import parse_alphas

    started = time.perf_counter()
    alphas = parse_alphas(alpha)
    require_files(zeroshot, finetuned)
    import soupkit

    if evaluate is not None:
        fishers = None
        if fisher is not None:
            fishers = tuple(p for p in fisher.split(",") if p)
            if len(fishers) != 2:
                raise ParameterError("--fisher: give two files, ZS_FISHER,FT_FISHER")
        result = soupkit.wise_sweep(zeroshot, finetuned, alphas, evaluate, select=select, output=output,
                                    force=force, fisher=fishers, fisher_floor=fisher_floor,
                                    report_dir=report_dir or output.parent, progress=_show_progress(quiet))
        if not quiet:
            result.print_table()
        _summary([output], started, quiet)
        return
    if fisher is not None:
        raise ParameterError("--fisher needs --eval (the Fisher-weighted sweep scores each α)")
    single = len(alphas) == 1 and ("," not in alpha and ":" not in alpha)
    written = soupkit.wise_ft(zeroshot, finetuned, alphas[0] if single else alphas, output, dtype=dtype,
                              precise=precise, device=device, allow_nonfinite=allow_nonfinite, ema=ema, force=force,
                              progress=_show_progress(quiet),
                              shard_size=parse_size(shard_size, "--shard-size") if shard_size else None)
    _summary([Path(p) for p in (written if isinstance(written, list) else [written])], started, quiet)


@app.command(epilog="Example:\n\n  soupkit methods")
def methods() -> None:
    """List the merge methods, their parameters and papers."""
    from rich.console import Console
    from rich.table import Table

    from soupkit.merging import get_method, list_methods

    table = Table(title="soupkit merge methods")
    for column in ("method", "what it does", "parameters", "paper"):
        table.add_column(column, overflow="fold")
    for name in list_methods():
        spec = get_method(name)
        params = "\n".join(p.describe() for p in spec.parameters.values())
        if spec.needs_base:
            params = (params + "\nneeds --base").strip()
        table.add_row(name, spec.description, params or "-", spec.reference or "-")
    table.add_row("greedy", "Greedy soup: add ingredients best-first while held-out accuracy improves (--eval).",
                  "accept, prescreen", "https://arxiv.org/abs/2203.05482")
    table.add_row("learned", "Learned soup: mixing weights optimised on held-out data (--eval).", "by_layer",
                  "https://arxiv.org/abs/2203.05482")
    Console().print(table)
