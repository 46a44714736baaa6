"""``soupkit inspect`` and ``soupkit convert``: thin shells over ``soupkit.inspection``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from soupkit.cli._app import app, require_files
from soupkit.cli.options import Quiet, generated_options
from soupkit.options import OutputOptions


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


@app.command(epilog="Examples:\n\n  soupkit inspect soup.safetensors\n\n"
             "  soupkit inspect soup.safetensors --keys\n\n"
             "  soupkit inspect ft.safetensors --diff zs.safetensors")
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to describe.", show_default=False)],
    diff: Annotated[Path | None, typer.Option(help="Compare with another checkpoint: per-tensor L2, relative L2 "
                                                   "and cosine.", show_default=False)] = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every tensor (name, shape, dtype, bytes).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    ema: Annotated[bool, typer.Option("--ema", help="Describe the EMA weights of a .pt checkpoint.")] = False,
) -> None:
    """Show a checkpoint's tensors, parameter count, dtypes, size and soupkit provenance; or diff two."""
    from rich.table import Table

    # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
    from soupkit import inspection
    from soupkit.report.layout import Wrapped, print_table
    from soupkit.report.layout import console as real_width_console

    console = real_width_console()
    if diff is not None:
        report = inspection.diff(checkpoint, diff)
        if as_json:
            print(json.dumps(report, indent=2))
            return
        _print_diff(report, console)
        return
    info = inspection.describe(checkpoint, ema=ema)
    if as_json:
        print(json.dumps(info if keys else {k: v for k, v in info.items() if k != "keys"}, indent=2))
        return
    console.print(f"[bold]{info['name']}[/bold]  ({info['format']}, {_size(info['file_size'])} on disk)")
    console.print(f"{info['tensors']:,} tensors, {info['parameters']:,} parameters, "
                  f"{_size(info['tensor_bytes'])} of tensor data")
    if info["tied"]:
        pairs = ", ".join(f"{alias} = {canonical}" for alias, canonical in list(info["tied"].items())[:3])
        console.print(f"tied: {len(info['tied'])} tensor(s) share another's weights, counted once ({pairs})")
    if info["ema"]:
        console.print("EMA weights: present (--ema reads them instead of the model weights)")
    dtypes = Table(title="by dtype")
    for column in ("dtype", "tensors", "parameters", "bytes"):
        dtypes.add_column(column, justify="right" if column != "dtype" else "left")
    for name, row in info["dtypes"].items():
        dtypes.add_row(name, f"{row['tensors']:,}", f"{row['parameters']:,}", _size(row["bytes"]))
    print_table(dtypes, console)
    if info["metadata"]:
        meta = Table(title="metadata")
        meta.add_column("key", no_wrap=True)
        meta.add_column("value", overflow="fold")
        for key, value in info["metadata"].items():
            meta.add_row(key, value if isinstance(value, str) else json.dumps(value, indent=1))
        print_table(meta, console)
    if keys:
        tensors = Table(title="tensors")
        tensors.add_column("name")
        for column in ("shape", "dtype", "bytes"):
            tensors.add_column(column, no_wrap=True, justify="right" if column == "bytes" else "left")
        for row in info["keys"]:
            tensors.add_row(Wrapped(row["key"]), str(tuple(row["shape"])), row["dtype"], _size(row["bytes"]))
        print_table(tensors, console)


_STATUS = {"changed": "changed", "shape": "shape differs", "only_a": "only in A", "only_b": "only in B",
           "same": "identical"}


def _print_diff(report: dict, console: Any) -> None:
    """The per-tensor table (what differs first), then the whole-model line: distances only over the
    tensors the two share; two checkpoints that share none are said to, not reported as "L2 0"."""
    from rich.table import Table

    # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
    from soupkit.report.layout import Wrapped, print_table

    table = Table(title=f"A = {report['a']}\nB = {report['b']}", title_justify="left")
    table.add_column("tensor")
    table.add_column("status", no_wrap=True)
    for column in ("L2", "relative L2", "cosine", "max |Δ|"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in report["tensors"]:
        table.add_row(Wrapped(row["key"]), _STATUS.get(row["status"], row["status"]),
                      *(_num(row[k]) for k in ("l2", "relative_l2", "cosine", "max_abs")))
    print_table(table, console)
    counts = ", ".join(f"{n} {_STATUS.get(k, k)}" for k, n in sorted(report["counts"].items(),
                                                                     key=lambda kv: _ORDER.index(kv[0])))
    summary = report["summary"]
    if not summary.get("shared_float_tensors"):
        console.print(f"the two checkpoints share no floating-point tensors to compare ({counts})")
        return
    console.print(f"over the {summary['shared_float_tensors']} floating-point tensors they share: L2 "
                  f"{_num(summary['l2'])}, relative L2 {_num(summary['relative_l2'])}, cosine "
                  f"{_num(summary['cosine'])}; {counts}")


_ORDER = tuple(_STATUS)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


@app.command(epilog="Examples:\n\n  soupkit convert wiseft_zeroshot.pt zeroshot.safetensors\n\n"
             "  soupkit convert model.ckpt model.safetensors --ema --dtype bf16")
@generated_options()
def convert(
    source: Annotated[Path, typer.Argument(help="Any checkpoint soupkit reads (.pt, pickled module, shards...).",
                                           show_default=False)],
    output: Annotated[str, typer.Argument(help="Output file (.safetensors, .pt, .ckpt) or folder (ends with /).",
                                          metavar="OUTPUT", show_default=False)],
    quiet: Quiet = False,
    options: OutputOptions | None = None,
) -> None:
    """Convert a checkpoint to safetensors (e.g. a pickled wise-ft .pt), streaming one tensor at a time."""
    require_files(source)
    # lazy: loaded when the command runs, so `soupkit --help` and argument errors stay quick and torch-free
    from soupkit import inspection

    written = inspection.convert(source, output, options=options)
    if not quiet:
        typer.echo(f"wrote {written}", err=True)
