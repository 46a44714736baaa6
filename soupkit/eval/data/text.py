"""Text data for ``kind: transformers`` models: ``kind: jsonl`` (one JSON object per line), ``kind: csv`` (a header
row, then one example per row) and ``kind: hf_disk`` (a folder written by ``datasets``' ``save_to_disk``; needs
the optional ``datasets`` package).

Every kind takes the same field keys, which name the columns to read:

- sequence classification: ``text_field`` (+ ``text_pair_field`` for sentence pairs) and ``label_field`` (an
  integer class id, or a label name mapped through the model config's ``label2id``);
- causal-LM multiple choice: ``prompt_field``, ``choices_field`` (a list of strings; in a CSV cell a JSON list)
  and ``answer_field`` (the index of the right choice, or its text);
- causal-LM plain text: ``text_field`` alone (scored by mean per-token log-likelihood).

``max_length`` caps the tokens of an example (default: the model's limit). Which fields a dataset needs depends
on the recipe's model task and is checked when the data is tokenised (``soupkit.eval.text``); errors name the
file and line. The records are read here; nothing is tokenised here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError
from soupkit.eval.data import Source
from soupkit.eval.registry import data_adapter

FIELD_KEYS = ("text_field", "text_pair_field", "label_field", "prompt_field", "choices_field", "answer_field")


@dataclass
class TextRecords:
    """Rows of a text dataset: ``rows[i]`` is a mapping read from ``file`` at ``lines[i]`` (1-based line of a
    JSONL/CSV file, row index of a ``save_to_disk`` folder)."""

    file: Path
    rows: list[dict[str, Any]]
    lines: list[int]
    fields: dict[str, str | None]
    max_length: int | None = None
    unit: str = "line"  # "row" for save_to_disk folders (0-based row index)

    def __len__(self) -> int:
        return len(self.rows)

    def at(self, i: int) -> str:
        """``file:line`` of row ``i``, for errors."""
        return f"{self.file}:{self.lines[i]}" if self.unit == "line" else f"{self.file} row {self.lines[i]}"


def _records(path: Path, rows: list[dict[str, Any]], lines: list[int], fields: dict[str, Any],
             max_length: int | None, where: str, unit: str = "line") -> Source:
    if max_length is not None and max_length < 2:
        raise RecipeError(f"{where}.max_length: expected at least 2 tokens, got {max_length}")
    return Source(text=TextRecords(path, rows, lines, fields, max_length, unit))


@data_adapter("jsonl")
def jsonl(path: Path, text_field: str | None = None, text_pair_field: str | None = None,
          label_field: str | None = None, prompt_field: str | None = None, choices_field: str | None = None,
          answer_field: str | None = None, max_length: int | None = None, *, context: object = None) -> Source:
    """One JSON object per line (blank lines skipped)."""
    import json

    where = getattr(context, "where", "data")
    text = _read_text(path, where)
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecipeError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise RecipeError(f"{path}:{number}: expected a JSON object, got a {type(row).__name__}")
        rows.append(row)
        lines.append(number)
    fields = {"text_field": text_field, "text_pair_field": text_pair_field, "label_field": label_field,
              "prompt_field": prompt_field, "choices_field": choices_field, "answer_field": answer_field}
    return _records(path, rows, lines, fields, max_length, where)


@data_adapter("csv")
def csv_file(path: Path, text_field: str | None = None, text_pair_field: str | None = None,
             label_field: str | None = None, prompt_field: str | None = None, choices_field: str | None = None,
             answer_field: str | None = None, max_length: int | None = None, delimiter: str = ",", *,
             context: object = None) -> Source:
    """A header row naming the columns, then one example per row (a ``choices_field`` cell holds a JSON list)."""
    import csv
    import io

    where = getattr(context, "where", "data")
    if len(delimiter) != 1:
        raise RecipeError(f"{where}.delimiter: expected one character, got {delimiter!r}")
    reader = csv.reader(io.StringIO(_read_text(path, where), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        table = [(reader.line_num, row) for row in reader]
    except StopIteration:
        raise RecipeError(f"{path}: empty CSV file (expected a header row)") from None
    except csv.Error as error:
        raise RecipeError(f"{path}:{reader.line_num}: {error}") from None
    rows, lines = [], []
    for number, row in table:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise RecipeError(f"{path}:{number}: {len(row)} cells but the header has {len(header)}")
        rows.append(dict(zip(header, row)))
        lines.append(number)
    fields = {"text_field": text_field, "text_pair_field": text_pair_field, "label_field": label_field,
              "prompt_field": prompt_field, "choices_field": choices_field, "answer_field": answer_field}
    return _records(path, rows, lines, fields, max_length, where)


@data_adapter("hf_disk")
def hf_disk(path: Path, split: str | None = None, text_field: str | None = None, text_pair_field: str | None = None,
            label_field: str | None = None, prompt_field: str | None = None, choices_field: str | None = None,
            answer_field: str | None = None, max_length: int | None = None, *, context: object = None) -> Source:
    """A folder written by ``Dataset.save_to_disk`` (or a ``DatasetDict``'s, with ``split``); needs ``datasets``."""
    where = getattr(context, "where", "data")
    try:
        import datasets
    except ImportError:
        raise RecipeError(f"{where}.kind: hf_disk needs the 'datasets' package, which is not installed "
                          "(pip install datasets), or export the data as JSONL and use kind: jsonl") from None
    if not path.is_dir():
        raise RecipeError(f"{where}.path: {path} is not a folder written by save_to_disk")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as error:
        raise RecipeError(f"{where}.path: {path}: {str(error).splitlines()[0]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            from soupkit.errors import unknown_choice

            raise RecipeError(f"{where}.split: {unknown_choice('split', str(split), list(loaded))}")
        loaded = loaded[split]
    rows = [dict(row) for row in loaded]
    fields = {"text_field": text_field, "text_pair_field": text_pair_field, "label_field": label_field,
              "prompt_field": prompt_field, "choices_field": choices_field, "answer_field": answer_field}
    return _records(path, rows, list(range(len(rows))), fields, max_length, where, "row")


def _read_text(path: Path, where: str) -> str:
    if not path.is_file():
        raise RecipeError(f"{where}.path: {path} is not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise RecipeError(f"{where}.path: cannot read {path}: {error.strerror or error}") from None
