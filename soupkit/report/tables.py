"""Rich tables of soup results (greedy steps, WiSE-FT sweeps, learned weights); the CLI prints these."""

from __future__ import annotations

import math
from typing import Any

from soupkit.report.layout import display_names, name_cell


def _pct(value: Any) -> str:
    """An accuracy in percent. A negative score is a mean per-token log-likelihood (a causal LM on plain text;
    an accuracy never is negative): shown as it is, with its perplexity."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if value < 0:
        return f"{value:.4f} (ppl {math.exp(-value):.2f})" if value > -700 else f"{value:.4f}"
    return f"{100 * value:.2f}%"


def _unit(values: Any) -> str:
    """What the scores are: accuracies, or (negative) mean per-token log-likelihoods of a causal LM."""
    return "log-lik." if any(isinstance(v, (int, float)) and v < 0 for v in values) else "acc"


def greedy_table(result: Any) -> Any:
    """step | ingredient | individual acc | candidate acc | accepted? | note."""
    from rich.table import Table

    title = (f"Greedy soup ({result.rule.get('accept', 'gt')}): {len(result.ingredients)} of {len(result.names)} "
             f"ingredients, held-out {_pct(result.score)}")
    table = Table(title=title)
    labels, caption = display_names(result.names, "ingredients")
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("ingredient")
    unit = _unit([result.score, *(s.score for s in result.history)])
    for column in (f"individual {unit}", f"candidate {unit}"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("kept", justify="center", no_wrap=True)
    table.add_column("note")
    for step in result.history:
        candidate = _pct(step.candidate)
        if step.stopped_early:
            candidate = "stopped early"
        table.add_row(str(step.step), name_cell(labels[step.index]), _pct(step.score), candidate,
                      "[green]yes[/green]" if step.accepted else "[red]no[/red]", step.note)
    captions = [caption]
    stats = result.stats
    if stats.get("examples_full"):
        saved = stats["examples_saved"] / stats["examples_full"]
        captions.append(f"{stats['candidates_evaluated']} candidates; early stop evaluated "
                        f"{stats['examples_evaluated']:,} of {stats['examples_full']:,} held-out examples "
                        f"({100 * saved:.0f}% saved); {stats['seconds']:.1f} s")
    table.caption = "\n".join(c for c in captions if c) or None
    table.caption_justify = "left"
    return table


def sweep_table(result: Any) -> Any:
    """α | held-out | each other dataset | chosen."""
    from rich.table import Table

    points = result.history
    datasets = list(dict.fromkeys(name for p in points for name in p.accuracies))
    select = result.rule.get("select")
    # the label names what decided: the selection set's own scores, never another data set's
    deciding = [p.accuracies.get(select) if select else p.heldout for p in points]
    unit = "log-likelihood" if _unit(deciding) != "acc" else "accuracy"
    select = select or "held-out"
    table = Table(title=f"WiSE-FT sweep: α={result.alpha:g} chosen by {select} {unit}")
    table.add_column("α", justify="right", no_wrap=True)
    for name in datasets:
        table.add_column(name, justify="right", no_wrap=True)
    if any(p.shift is not None for p in points):
        table.add_column("mean shift", justify="right", no_wrap=True)
    table.add_column("chosen", justify="center", no_wrap=True)
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
    labels, caption = display_names(result.names, "ingredients")
    table.add_column("ingredient")
    table.add_column(f"individual {_unit(result.scores)}", justify="right", no_wrap=True)
    table.add_column("weight", justify="right", no_wrap=True)
    for label, score, weight in zip(labels, result.scores, weights):
        table.add_row(name_cell(label), _pct(score), f"{weight:.4f}")
    table.caption = caption
    table.caption_justify = "left"
    return table


def soup_table(result: Any) -> Any:
    """The table that matches ``result.method``."""
    tables = {"greedy": greedy_table, "wise_sweep": sweep_table, "learned": learned_table}
    return tables[result.method](result)


def search_table(result: Any) -> Any:
    """merge | held-out | each test set: the searched merge beside the best ingredient, the uniform and greedy
    soups and the method at its defaults (rows ``result.table``), and the search's own figures."""
    from rich.table import Table

    rows = result.table
    datasets = list(dict.fromkeys(name for scores in rows.values() for name in scores))
    heldout = result.heldout
    datasets = [heldout, *(d for d in datasets if d != heldout)] if heldout in datasets else datasets
    table = Table(title=f"Merge search ({result.method}): searched on {heldout} (*), reported on every set")
    table.add_column("merge", ratio=1)
    for name in datasets:
        table.add_column(f"{name} *" if name == heldout else name, justify="right", no_wrap=True)
    for label, scores in rows.items():
        table.add_row(name_cell(label), *(_pct(scores.get(d)) for d in datasets),
                      style="bold" if label.endswith(" searched") else None)
    stats = result.stats
    caption = f"{stats['candidates']} candidates in {stats['seconds']:.1f} s"
    if stats.get("best_ingredient"):
        caption = f"best ingredient: {stats['best_ingredient']}; {caption}"
    if stats.get("examples_full"):
        caption += (f"; early stop evaluated {stats['examples_evaluated']:,} of {stats['examples_full']:,} "
                    f"held-out examples ({100 * stats['examples_saved_fraction']:.0f}% saved)")
    table.caption, table.caption_justify = caption, "left"
    return table
