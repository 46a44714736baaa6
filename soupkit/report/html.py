"""One self-contained HTML page per run: the table, the plots (embedded as base64 PNG), the provenance and the
exact commands, readable offline (inline CSS, no script, no external URL).

A run is a soup's JSON record (``soup.json`` from ``soupkit merge -m greedy|learned`` or ``soupkit wise --eval``,
with its plots ``soup_*.png`` beside it) or a demo folder (``demo.json``, ``demo_run.json`` and its plots).
``soupkit report RUN_DIR`` writes ``<record>.html`` beside each record it finds (``report.html`` for a demo).
"""

from __future__ import annotations

import base64
import html
import json
import math
import shlex
from pathlib import Path
from typing import Any

from soupkit.errors import OutputError, ParameterError

#: the command line of this process when it is the ``soupkit`` CLI (set by ``soupkit.cli.main``): soup records
#: keep it, so a report can show the exact command that made the soup
INVOCATION: list[str] | None = None

SOUP_METHODS = {"greedy": "Greedy soup", "learned": "Learned soup", "wise_sweep": "WiSE-FT sweep"}

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 70em;
       padding: 0 1.5em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { font-weight: 600; background: #eef7ee; }
pre { background: #f6f8fa; padding: 0.8em 1em; overflow-x: auto; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; }
"""


def ingredient_label(name: str) -> str:
    """An ingredient's name in the demo's tables: its file name without the suffix."""
    return Path(name).name.removesuffix(".safetensors")


def best_ingredient(data: dict[str, Any]) -> str:
    """The ingredient the demo picked as best by held-out accuracy (the first of the best, as the demo does)."""
    models = data["models"]
    names = [ingredient_label(i["name"]) for i in data["ingredients"]]
    return max(names, key=lambda n: models[n]["heldout"])


def current_command() -> str | None:
    """The CLI command line of this process, shell-quoted (None for a library call)."""
    return shlex.join(INVOCATION) if INVOCATION else None


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    if value < 0:  # a mean per-token log-likelihood, never an accuracy
        return f"{value:.4f}"
    return f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list[Any]], *, numeric: set[int] = frozenset(),
           chosen: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f'<td class="num">{_esc(c)}</td>' if i in numeric else f"<td>{_esc(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f'<tr class="chosen">{cells}</tr>' if index in chosen else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_esc(path.name)}" src="data:image/png;base64,{data}"><figcaption class="note">' \
           f"{_esc(path.name)}</figcaption></figure>"


def _pre(text: str) -> str:
    return f"<pre>{_esc(text)}</pre>"


def _page(title: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{_esc(name)}</h2>{content}" for name, content in sections if content)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>{body}</body></html>\n")


# ------------------------------------------------------------------------------------------------ soups


def soup_table(record: dict[str, Any]) -> str:
    """The record's table, as the CLI prints it: greedy steps, sweep points or learned weights (accuracies in %)."""
    method, history = record["method"], record.get("history", [])
    if method == "greedy":
        rows = [[s["step"], s["name"], _pct(s.get("score")),
                 "stopped early" if s.get("stopped_early") else _pct(s.get("candidate")),
                 "yes" if s["accepted"] else "no", s.get("note", "")] for s in history]
        return _table(["step", "ingredient", "individual %", "candidate %", "kept", "note"], rows,
                      numeric={0, 2, 3}, chosen={i for i, s in enumerate(history) if s["accepted"]})
    if method == "wise_sweep":
        datasets = list(dict.fromkeys(name for p in history for name in p.get("accuracies", {})))
        rows = [[f"{p['alpha']:g}", *(_pct(p["accuracies"].get(d)) for d in datasets), _pct(p.get("shift")),
                 "chosen" if p.get("chosen") else ""] for p in history]
        return _table(["α", *(f"{d} %" for d in datasets), "mean shift %", ""], rows,
                      numeric=set(range(len(datasets) + 2)),
                      chosen={i for i, p in enumerate(history) if p.get("chosen")})
    weights = record.get("extra", {}).get("weights", [])
    rows = [[name, _pct(score), f"{weight:.4f}"] for name, score, weight in
            zip(record["names"], record.get("scores", []), weights)]
    return _table(["ingredient", "individual %", "weight"], rows, numeric={1, 2})


def _provenance(record: dict[str, Any]) -> str:
    """What the soup file says about itself (its safetensors metadata), when the file is still there."""
    path = record.get("path")
    if not path or not Path(path).exists():
        return "" if not path else f'<p class="note">{_esc(path)} is no longer there: no provenance to show.</p>'

    from soupkit.io import open_checkpoint  # lazy: the CLI imports this module at start-up; io loads torch

    with open_checkpoint(path) as reader:
        metadata = dict(reader.metadata)
    rows = [[key, value if len(value) < 400 else value[:400] + " …"] for key, value in sorted(metadata.items())]
    return f"<p>{_esc(path)}</p>" + _table(["metadata key", "value"], rows)


def soup_page(record_path: Path) -> str:
    record = json.loads(record_path.read_text())
    title = f"{SOUP_METHODS[record['method']]}: {record_path.stem}"
    score = _pct(record.get("score"))
    summary = f"<p>held-out {score} %" + (f", α = {record['extra']['alpha']:g}" if record["method"] == "wise_sweep"
                                         else f", {len(record['ingredients'])} of {len(record['names'])} "
                                              f"ingredients: {_esc(', '.join(record.get('chosen', [])))}") + "</p>"
    plots = "".join(_image(p) for p in sorted(record_path.parent.glob(f"{record_path.stem}_*.png")))
    command = record.get("command")
    commands = _pre(command) if command else '<p class="note">made by a library call (no command line)</p>'
    rule = _pre(json.dumps({"rule": record.get("rule"), "stats": record.get("stats")}, indent=2))
    return _page(title, [("Result", summary + soup_table(record)), ("Plots", plots),
                         ("Command", commands), ("Provenance", _provenance(record) + rule)])


# ------------------------------------------------------------------------------------------------- demo


def demo_page(folder: Path) -> str:
    data = json.loads((folder / "demo.json").read_text())
    run = json.loads((folder / "demo_run.json").read_text()) if (folder / "demo_run.json").exists() else {}
    models = data["models"]
    # demo.json's keys are sorted (for byte-identical files): put them back in the story's order
    first = ["heldout", "clean"]
    columns = first + sorted(c for c in next(iter(models.values())) if c not in (*first, "mean_shift"))
    columns.append("mean_shift")
    story = ["pretrained", *sorted(m for m in models if m.startswith("finetuned_")), "best individual",
             "uniform soup", "greedy soup", "learned soup"]
    order = [m for m in story if m in models] + [m for m in models if m not in story]
    rows = [[name, *(_pct(models[name].get(c)) for c in columns)] for name in order]
    table = _table(["model", *(f"{c.replace('_', ' ')} %" for c in columns)], rows,
                   numeric=set(range(1, len(columns) + 1)))
    config = data["config"]
    best = best_ingredient(data)
    flags = f" --seed {config['seed']}" * (config["seed"] != 0) + " --quick" * bool(config["quick"])
    out = shlex.quote(str(folder))
    commands = "\n".join([
        f"soupkit demo --out {out}{flags}",
        f"soupkit merge --method greedy {out}/ingredients/*.safetensors --eval {out}/recipe.yaml -o greedy.safetensors",
        f"soupkit wise {out}/pretrained.safetensors {out}/ingredients/{best}.safetensors --alpha 0:1:0.1 "
        f"--eval {out}/recipe.yaml -o wise.safetensors",
        f"soupkit doctor {out}/ingredients/*.safetensors --base {out}/pretrained.safetensors --eval {out}/recipe.yaml",
    ])
    plots = "".join(_image(p) for p in sorted(folder.glob("*.png")))
    provenance = _pre(json.dumps({"config": config, "torch": run.get("torch"), "seconds": run.get("seconds")},
                                 indent=2))
    return _page(f"soupkit demo: {folder.name}", [
        ("Accuracy (%)", table + f"<p>{_esc(data.get('summary', ''))}</p>"), ("Plots", plots),
        ("Commands", _pre(commands)), ("Provenance", provenance)])


# ---------------------------------------------------------------------------------------------- finding


def find_runs(path: Path) -> list[tuple[Path, str]]:
    """(record, kind) for every run under ``path`` (a folder or one record): ``demo`` or a soup method."""
    candidates = [path] if path.is_file() else sorted(path.glob("*.json"))
    runs = []
    for candidate in candidates:
        if candidate.name == "demo.json":
            runs.append((candidate, "demo"))
            continue
        if candidate.name == "demo_run.json":
            continue
        try:
            record = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("method") in SOUP_METHODS and "history" in record:
            runs.append((candidate, record["method"]))
    return runs


def page_for(record: Path, kind: str) -> tuple[Path, str]:
    """Where the page of ``record`` goes (beside it) and its HTML."""
    if kind == "demo":
        return record.parent / "report.html", demo_page(record.parent)
    return record.with_suffix(".html"), soup_page(record)


def write_reports(path: str | Path, *, output: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write one HTML page per run found at ``path``; ``output`` names the page when there is one run. An
    existing page is replaced only with ``force``; everything is checked before anything is written."""

    path = Path(path)
    if not path.exists():
        raise ParameterError(f"{path}: no such file or folder")
    runs = find_runs(path)
    if not runs:
        raise ParameterError(f"{path}: no run found (a demo's demo.json, or a soup's JSON record: greedy, "
                             "learned or WiSE-FT sweep)")
    if output is not None and len(runs) > 1:
        raise ParameterError(f"-o: {path} holds {len(runs)} runs; give one record, or leave -o out")
    pages = []
    for record, kind in runs:
        try:
            pages.append(page_for(record, kind))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:  # a hand-edited record
            what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
            raise ParameterError(f"{record}: not a complete soupkit record ({what}); write it again with the "
                                 "command that made it") from None
    if output is not None:
        pages = [(Path(output), pages[0][1])]
    for target, _ in pages:
        if target.exists() and not force:
            raise OutputError(f"{target} exists; pass --force to replace it")
        if not target.parent.is_dir():
            raise OutputError(f"-o: folder {target.parent} does not exist")
    from soupkit.io.atomic import atomic_write_text  # lazy: the CLI imports this module; soupkit.io loads torch

    return [atomic_write_text(target, text) for target, text in pages]
