"""``soupkit doctor``: a thin shell over ``soupkit.doctor``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from soupkit.cli._app import app, require_files, wide_console


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
    recipe: Annotated[str | None, typer.Option("--eval", "-e", help="Evaluation recipe (a YAML path or a built-in "
                                                                     "name): adds held-out scores, interpolation "
                                                                     "barriers and the uniform soup's score.",
                                               show_default=False)] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every number as JSON here.",
                                                  show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a heatmap of the pairwise angles (PNG) here.",
                                              show_default=False)] = None,
    device: Annotated[str | None, typer.Option(help="Evaluation device: auto, cpu, cuda or cuda:N \\[default: the "
                                                    "recipe's].", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table.")] = False,
) -> None:
    """Will these checkpoints soup? Compares the task vectors (norms, distances, angles; whole model and per
    module) in one streaming pass and gives each ingredient a verdict: soupable, duplicate, different_init,
    different_basin (with --eval) or incompatible; then one overall verdict."""
    require_files(*checkpoints, base)
    from soupkit.diagnosis import doctor as run_doctor

    report = run_doctor(checkpoints, base=base, evaluator=recipe, json=json_out, plot=plot, device=device)
    if not quiet:
        console = wide_console()
        console.print(report.table())
        console.print(report.module_note(), style="dim", soft_wrap=True)
