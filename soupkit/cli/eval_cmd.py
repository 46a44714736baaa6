"""``soupkit eval`` and ``soupkit zeroshot``: thin shells over ``soupkit.eval``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from soupkit.cli._app import app, require_files
from soupkit.cli.options import CacheDir, NoCache, Output, Quiet, generated_options
from soupkit.options import DEVICE_CHOICES, OutputOptions


@app.command("eval", epilog="Examples:\n\n"
             "  soupkit eval finetuned_*.safetensors --eval digits\n\n"
             "  soupkit eval zs.safetensors soup.safetensors --eval recipes/clip-vit-b32-imagenet.yaml "
             "--json scores.json --csv scores.csv\n\n"
             "  soupkit eval ft/* soup.safetensors --eval llm-multiple-choice.yaml   (transformers checkpoints)\n\n"
             "  torchrun --nproc-per-node 4 -m soupkit eval soup.safetensors --eval my_recipe.yaml")
def eval_command(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints to score (.safetensors, .pt, sharded "
                                                            "index or folder).", show_default=False)],
    recipe: Annotated[str, typer.Option("--eval", "-e", help="Evaluation recipe: a YAML path or a built-in name "
                                                            "(digits, clip-vit-b32-imagenet, timm-imagefolder).",
                                        show_default=False)],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write every number as JSON here.",
                                                  show_default=False)] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Also write the accuracy table as CSV here.",
                                                 show_default=False)] = None,
    datasets: Annotated[str | None, typer.Option(help="Only these datasets, comma-separated \\[default: all].",
                                                 show_default=False)] = None,
    device: Annotated[str | None, typer.Option(help=f"{DEVICE_CHOICES} \\[default: the recipe's].",
                                               show_default=False)] = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; no table.")] = False,
) -> None:
    """Score checkpoints on a recipe's held-out and test sets: a table of accuracy per dataset (mean per-token
    log-likelihood and perplexity for plain text under a causal LM), plus the mean over distribution shifts."""
    require_files(*checkpoints)
    # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
    from soupkit.eval.report import evaluate_checkpoints

    names = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None
    report = evaluate_checkpoints(checkpoints, recipe, device=device, datasets=names, cache_dir=cache_dir,
                                  use_cache=not no_cache, progress=not quiet and sys.stderr.isatty(),
                                  json_path=json_out, csv_path=csv_out)
    import os

    if not quiet and int(os.environ.get("RANK", "0")) == 0:  # under torchrun the first process reports
        # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
        from soupkit.report.layout import console as real_width_console
        from soupkit.report.layout import print_table

        console = real_width_console()
        print_table(report.table(), console)
        for note in report.notes():
            console.print(note, style="dim")


@app.command(epilog="Examples:\n\n"
             "  soupkit zeroshot --model ViT-B-32 --weights vit_b32_openai.safetensors -o zs.safetensors\n\n"
             "  soupkit zeroshot --model ViT-B-32 --weights W.safetensors --classes classes.txt "
             "--templates openai -o zs.safetensors")
@generated_options()
def zeroshot(
    model: Annotated[str, typer.Option(help="open_clip model name, e.g. ViT-B-32.", show_default=False)],
    output: Output,
    weights: Annotated[Path | None, typer.Option(help="Local CLIP weights (nothing is downloaded) \\[default: "
                                                      "random initialisation].", show_default=False)] = None,
    classes: Annotated[str, typer.Option(help="'imagenet' or a text file with one class name per line.")
                       ] = "imagenet",
    templates: Annotated[str, typer.Option(help="'openai' (80 prompts), 'simple', or a text file with one "
                                                "template per line, '{}' for the class name.")] = "openai",
    config: Annotated[Path | None, typer.Option(help="An open_clip model-config JSON for an architecture "
                                                     "open_clip does not ship (named by the file's stem).",
                                                show_default=False)] = None,
    quiet: Quiet = False,
    options: OutputOptions | None = None,
) -> None:
    """Write a CLIP zero-shot classifier (image encoder + WiSE-FT-style head) as a checkpoint: the start of
    WiSE-FT and of fine-tuned ingredients."""
    # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
    from soupkit.eval.models.clip import zeroshot_checkpoint

    path = zeroshot_checkpoint(model, classes, templates, weights=weights, output=output, config=config,
                               options=options)
    if not quiet:
        print(f"wrote {path}", file=sys.stderr)
