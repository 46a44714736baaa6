"""``soupkit fisher``: a thin shell over ``soupkit.merging.fisher_info.compute_fisher``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from soupkit.cli._app import app


@app.command(epilog="Examples:\n\n"
             "  soupkit fisher ft_a.safetensors --eval recipes/digits.yaml -o ft_a.fisher.safetensors\n\n"
             "  soupkit merge ft_a.safetensors ft_b.safetensors --method fisher "
             "--fisher ft_a.fisher.safetensors,ft_b.fisher.safetensors -o fisher.safetensors")
def fisher(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint whose Fisher information to compute.",
                                               show_default=False)],
    evaluate: Annotated[str, typer.Option("--eval", help="Evaluation recipe (YAML path or built-in name): its "
                                                         "model and held-out data.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output Fisher file (.safetensors), keyed like "
                                                                "the checkpoint.", show_default=False)],
    max_examples: Annotated[int | None, typer.Option(help="Use at most this many held-out examples.",
                                                     show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling labels from the model's predictions.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file (never an input).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Diagonal Fisher information of a checkpoint on the recipe's held-out data (for --method fisher)."""
    from functools import partial

    # lazy: torch loads here, not at CLI start-up (``soupkit --help`` stays torch-free)
    from soupkit.eval import Evaluator
    from soupkit.merging.fisher_info import compute_fisher

    # the evaluator is built after compute_fisher has checked the output path (a bad -o fails in milliseconds)
    written = compute_fisher(checkpoint, partial(Evaluator.from_recipe, evaluate), output, max_examples, seed=seed,
                             force=force)
    if not quiet:
        typer.echo(f"wrote {written}", err=True)
