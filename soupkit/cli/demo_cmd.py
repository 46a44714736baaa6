"""``soupkit demo``: a thin shell over ``soupkit.demo.run_demo``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from soupkit.cli._app import app


@app.command(epilog="Examples:\n\n  soupkit demo\n\n  soupkit demo --ingredients 8 --seed 1 --out runs/demo\n\n"
             "  soupkit demo --quick   # a smaller run (< 30 s) for a smoke test")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for checkpoints, plots, table and JSON.")] = Path("soupkit-demo"),
    ingredients: Annotated[int, typer.Option(min=2, max=64, help="Fine-tuned models to soup.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed for data splits, training and hyperparameters.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="A smaller, faster run (4 ingredients, short training).")
                     ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
) -> None:
    """The whole story on bundled data (scikit-learn digits; no downloads): pretrain a robust model, fine-tune
    ingredients, then compare the best ingredient with uniform, greedy and learned soups and a WiSE-FT sweep."""
    from rich.console import Console

    # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
    from soupkit.demo import results_table, run_demo
    from soupkit.report.layout import console as real_width_console
    from soupkit.report.layout import print_table

    console = Console(stderr=True, highlight=False)
    result = run_demo(out, ingredients=ingredients, seed=seed, quick=quick, device=device,
                      log=lambda line: console.print(f"[dim]{line}[/dim]"), progress=sys.stderr.isatty())
    stdout = real_width_console()
    print_table(results_table(result.rows), stdout)
    stdout.print(result.summary)
    others = [name for name in result.files if name != "recipe.yaml"]
    console.print(f"wrote {out / 'demo.json'} (every number; the same --seed gives the same file), "
                  f"{out / 'demo_run.json'} (timings), {out / 'recipe.yaml'} (the recipe to use with --eval), "
                  f"{len(result.ingredients)} ingredients in {out / 'ingredients'}/, and "
                  + ", ".join(str(out / name) for name in others) + f" in {result.seconds:.0f} s")
