"""``soupkit extract-lora``: a thin shell over ``soupkit.merging.extract.extract_lora``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from soupkit.cli._app import app


@app.command("extract-lora", epilog="Examples:\n\n"
             "  soupkit extract-lora finetuned/ base/ --rank 16 -o adapter/\n\n"
             "  soupkit extract-lora finetuned/ base/ --rank 64 --embed-lora --device cuda -o adapter/")
def extract_lora_command(
    finetuned: Annotated[Path, typer.Argument(help="The fine-tuned model (checkpoint or Hugging Face folder).",
                                              show_default=False)],
    base: Annotated[Path, typer.Argument(help="The base model it was fine-tuned from.", show_default=False)],
    rank: Annotated[int, typer.Option(help="LoRA rank of every module (at most its smaller dimension).",
                                      show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output adapter folder (peft's layout).",
                                         show_default=False)],
    embed_lora: Annotated[bool, typer.Option("--embed-lora", help="Factorise the embeddings too (default: save "
                                                                  "them whole in modules_to_save).")] = False,
    device: Annotated[str, typer.Option(help="Where the SVDs run: cpu, cuda, cuda:1, mps.")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output (never an input).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table of per-module errors.")] = False,
) -> None:
    """The LoRA adapter closest to FINETUNED - BASE (truncated SVD per module); prints each module's error."""
    from soupkit.merging.extract import extract_lora  # lazy: torch loads only when the command runs

    result = extract_lora(finetuned, base, output, rank, embed_lora=embed_lora, device=device, force=force)
    if quiet:
        return
    width = max((len(k) for k in result.errors), default=6)
    typer.echo(f"{'module':<{width}}  {'shape':>12}  {'rank':>4}  rel. error")
    for key, error in result.errors.items():
        shape = "x".join(map(str, result.shapes[key]))
        typer.echo(f"{key:<{width}}  {shape:>12}  {result.ranks[key]:>4}  {error:.3e}")
    typer.echo(f"overall relative error {result.relative_error:.3e}; {len(result.saved_whole)} tensor(s) saved "
               f"whole (modules_to_save), {len(result.unchanged)} unchanged; wrote {result.folder}", err=True)
