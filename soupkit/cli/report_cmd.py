"""``soupkit report``: a thin shell over ``soupkit.report.html.write_reports``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from soupkit.cli._app import app


@app.command(epilog="Examples:\n\n  soupkit report soupkit-demo   # report.html, and NAME.html beside each "
             "soup's record\n\n  soupkit report greedy.json -o greedy.html")
def report(
    run: Annotated[Path, typer.Argument(help="A run folder (a demo's, or one holding soups' JSON records) or one "
                                             "record.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The page to write (one run only) "
                                                "\\[default: beside each record].", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing page.")] = False,
) -> None:
    """One self-contained HTML page per run: the table, the plots, the provenance and the exact commands,
    readable offline."""
    import sys

    from soupkit.report.html import write_reports  # lazy: as every command body

    for page in write_reports(run, output=output, force=force):
        print(f"wrote {page}", file=sys.stderr)
