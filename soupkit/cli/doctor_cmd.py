"""``soupkit doctor``: a thin shell over ``soupkit.doctor``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from soupkit.cli._app import app, require_files
from soupkit.cli.options import CacheDir, EvalRecipe, NoCache, Quiet


@app.command(epilog="Examples:\n\n"
             "  soupkit doctor ckpt/*.safetensors --base zs.safetensors\n\n"
             "  soupkit doctor ckpt/*.safetensors --base zs.safetensors --eval digits --json doctor.json "
             "--plot angles.png")
def doctor(
    checkpoints: Annotated[list[Path], typer.Argument(help="Ingredients to check (.safetensors, .pt, sharded index "
                                                            "or folder); at least two.", show_default=False)],
    base: Annotated[Path | None, typer.Option(help="The pretrained model they were fine-tuned from: angles are "
                                                   "then measured from it (the paper's φ) \\[default: from the "
                                                   "mean of the inputs].", show_default=False)] = None,
    recipe: EvalRecipe = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every number as JSON here.",
                                                  show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a heatmap of the pairwise angles (PNG) here.",
                                              show_default=False)] = None,
    device: Annotated[str | None, typer.Option(help="Evaluation device: auto, cpu, cuda or cuda:N \\[default: the "
                                                    "recipe's].", show_default=False)] = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
) -> None:
    """Will these checkpoints soup? Compares the task vectors (norms, distances, angles; whole model and per
    module) in one streaming pass and gives each ingredient a verdict: soupable, duplicate, different_init,
    different_basin (with --eval) or incompatible; then one overall verdict."""
    require_files(*checkpoints, base)
    # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
    from soupkit.diagnosis import doctor as run_doctor

    judge = None
    if recipe is not None:
        # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
        from soupkit.eval import Evaluator

        judge = Evaluator.from_recipe(recipe, device=device, cache_dir=cache_dir, use_cache=not no_cache)
    report = run_doctor(checkpoints, base=base, evaluator=judge, json=json_out, plot=plot)
    if not quiet:
        report.print()
