"""Rich tables of soup results (greedy steps, WiSE-FT sweeps, learned weights); the CLI prints these."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pct(value: Any) -> str:
    """An accuracy in percent. A negative score is a mean per-token log-likelihood (a causal LM on plain text;
    an accuracy never is negative): shown as it is, with its perplexity."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if value < 0:
        return f"{value:.4f} (ppl {math.exp(-value):.2f})" if value > -700 else f"{value:.4f}"
    return f"{100 * value:.2f}%"


def _short(name: str, width: int = 40) -> str:
    if len(name) <= width:
        return name
    return "…" + Path(name).name[-(width - 1):]


def greedy_table(result: Any) -> Any:
    """step | ingredient | individual acc | candidate acc | accepted? | note."""
    from rich.table import Table

    title = (f"Greedy soup ({result.rule.get('accept', 'gt')}): {len(result.ingredients)} of {len(result.names)} "
             f"ingredients, held-out {_pct(result.score)}")
    table = Table(title=title)
    for column, justify in (("step", "right"), ("ingredient", "left"), ("individual acc", "right"),
                            ("candidate acc", "right"), ("accepted?", "center"), ("note", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for step in result.history:
        candidate = _pct(step.candidate)
        if step.stopped_early:
            candidate = "stopped early"
        table.add_row(str(step.step), _short(step.name), _pct(step.score), candidate,
                      "[green]yes[/green]" if step.accepted else "[red]no[/red]", step.note)
    stats = result.stats
    if stats.get("examples_full"):
        saved = stats["examples_saved"] / stats["examples_full"]
        table.caption = (f"{stats['candidates_evaluated']} candidates; early stop evaluated "
                         f"{stats['examples_evaluated']:,} of {stats['examples_full']:,} held-out examples "
                         f"({100 * saved:.0f}% saved); {stats['seconds']:.1f} s")
    return table


def sweep_table(result: Any) -> Any:
    """α | held-out | each other dataset | chosen."""
    from rich.table import Table

    points = result.history
    datasets = list(dict.fromkeys(name for p in points for name in p.accuracies))
    select = result.rule.get("select") or "held-out"
    table = Table(title=f"WiSE-FT sweep: α={result.alpha:g} chosen by {select} accuracy")
    table.add_column("α", justify="right")
    for name in datasets:
        table.add_column(name, justify="right")
    if any(p.shift is not None for p in points):
        table.add_column("mean shift", justify="right")
    table.add_column("chosen", justify="center")
    for p in points:
        row = [f"{p.alpha:g}", *(_pct(p.accuracies.get(name)) for name in datasets)]
        if any(q.shift is not None for q in points):
            row.append(_pct(p.shift))
        row.append("[green]◀[/green]" if p.chosen else "")
        table.add_row(*row, style="bold" if p.chosen else None)
    return table


def learned_table(result: Any) -> Any:
    """ingredient | individual acc | learned weight (mean over tensors for a by-layer soup)."""
    from rich.table import Table

    weights = result.extra.get("weights", [])
    table = Table(title=f"Learned soup: held-out {_pct(result.score)}, loss "
                        f"{result.extra.get('heldout_loss', math.nan):.4f} (uniform "
                        f"{result.extra.get('uniform_loss', math.nan):.4f}), temperature "
                        f"{result.extra.get('temperature', math.nan):.3f}")
    table.add_column("ingredient", overflow="fold")
    table.add_column("individual acc", justify="right")
    table.add_column("weight", justify="right")
    for name, score, weight in zip(result.names, result.scores, weights):
        table.add_row(_short(name), _pct(score), f"{weight:.4f}")
    return table


def soup_table(result: Any) -> Any:
    """The table that matches ``result.method``."""
    tables = {"greedy": greedy_table, "wise_sweep": sweep_table, "learned": learned_table}
    return tables[result.method](result)
