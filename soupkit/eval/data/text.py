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

Hostile files are read in bounded memory (issue 26, class 5: peak memory a small constant times the file): a
JSONL or CSV file is streamed one line at a time, a line longer than ``MAX_LINE_BYTES`` is refused naming the file
and line (before it is decoded or parsed); JSON nesting deeper than ``MAX_DEPTH``, integers of more than
``MAX_INT_DIGITS`` digits in a field that is read, raw NUL bytes and bad UTF-8 are refused the same way. Of each
row only the fields the recipe names are kept, in per-field columns (one pointer per field and row, no dict per
row), and each must be present and of a plain type (text, an integer, a list of texts for choices).
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import RecipeError, unknown_choice
from soupkit.eval.data import Source
from soupkit.eval.registry import data_adapter

FIELD_KEYS = ("text_field", "text_pair_field", "label_field", "prompt_field", "choices_field", "answer_field")
#: the longest line of a JSONL or CSV file read: json.loads of a line holds up to ~30x its size in Python objects
#: while it parses (a line of ``{},{},...``), so 16 MiB bounds that at ~0.5 GB; text this long is cut to the
#: model's ``max_length`` anyway (a 128k-token context is ~0.5 MB of text)
MAX_LINE_BYTES = 16 << 20
#: integers in a field are class ids or choice indices: 18 digits fit int64; longer ones (a 5,000-digit answer)
#: are refused instead of being converted (Python caps int() at 4,300 digits, and the work is quadratic)
MAX_INT_DIGITS = 18
#: field keys whose values must be text
_TEXT_KEYS = ("text_field", "text_pair_field", "prompt_field")
#: an integer written as text (a CSV cell): ASCII digits only ("²".isdigit() is true, int("²") fails)
_DIGITS = re.compile(r"\s*-?[0-9]{1,18}\s*")
_SURROGATE = re.compile("[\ud800-\udfff]")


def shown(value: Any, width: int = 60) -> str:
    """``repr(value)`` in at most ``width`` characters: an error line never echoes a whole hostile field."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 5]}...{text[-2:]}"


def parse_index(value: Any) -> int | None:
    """An integer field value (CSV gives text: ASCII digits only, at most 18), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    return None


class _LongInteger:
    """Stands for a JSON integer of more than ``MAX_INT_DIGITS`` digits (never converted)."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _json_int(text: str) -> int | _LongInteger:
    digits = len(text) - text.startswith("-")
    return int(text) if digits <= MAX_INT_DIGITS else _LongInteger(digits)


_DECODER = json.JSONDecoder(parse_int=_json_int)


@dataclass
class TextRecords:
    """Rows of a text dataset, stored by column: ``columns[key][i]`` is row ``i``'s value of the field that
    ``fields[key]`` names (only the fields the recipe names are kept), read from ``file`` at ``lines[i]``
    (1-based line of a JSONL/CSV file, row index of a ``save_to_disk`` folder)."""

    file: Path
    columns: dict[str, list[Any]]
    lines: array
    fields: dict[str, str | None]
    max_length: int | None = None
    unit: str = "line"  # "row" for save_to_disk folders (0-based row index)

    def __len__(self) -> int:
        return len(self.lines)

    def value(self, i: int, key: str) -> Any:
        """Row ``i``'s value of field ``key`` (``text_field``, ...)."""
        return self.columns[key][i]

    def at(self, i: int) -> str:
        """``file:line`` of row ``i``, for errors."""
        return f"{self.file}:{self.lines[i]}" if self.unit == "line" else f"{self.file} row {self.lines[i]}"


class _Columns:
    """Collects the named fields of each row into columns, checking each value as it comes."""

    def __init__(self, path: Path, fields: dict[str, str | None], context: object, unit: str = "line"):
        text = getattr(getattr(context, "model", None), "text", None)
        if text is not None:  # the fields the model's task needs, checked before any row is read
            from soupkit.eval.text import scoring_mode

            scoring_mode(getattr(context, "where", "data"), fields, text.task)
        self.path, self.fields, self.unit = path, fields, unit
        self.named = {key: name for key, name in fields.items() if name is not None}
        self.columns: dict[str, list[Any]] = {key: [] for key in self.named}
        self.lines = array("q")

    def where(self, number: int) -> str:
        return f"{self.path}:{number}" if self.unit == "line" else f"{self.path} row {number}"

    def add(self, row: Mapping[str, Any], number: int) -> None:
        for key, name in self.named.items():
            if name not in row:
                keys = sorted(str(k) for k in row)
                raise RecipeError(f"{self.where(number)}: no field {name!r} ({key}); the row has "
                                  f"{shown(keys[:8], 120)}")
            self.columns[key].append(_checked(row[name], key, name, self.where(number)))
        self.lines.append(number)

    def records(self, max_length: int | None, where: str) -> Source:
        if max_length is not None and max_length < 2:
            raise RecipeError(f"{where}.max_length: expected at least 2 tokens, got {max_length}")
        return Source(text=TextRecords(self.path, self.columns, self.lines, self.fields, max_length, self.unit))


def _checked(value: Any, key: str, name: str, where: str) -> Any:
    """A field's value if its type can be what ``key`` needs (the meaning is checked when tokenising)."""
    if isinstance(value, _LongInteger):
        raise RecipeError(f"{where}: field {name!r} holds an integer of {value.digits} digits (at most "
                          f"{MAX_INT_DIGITS})")
    if key in _TEXT_KEYS:
        ok = isinstance(value, str)
    elif key == "choices_field":
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(c, str) for c in value))
    else:  # label / answer: an index or a name
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        expected = {"choices_field": "a list of strings", "label_field": "a class id or label name",
                    "answer_field": "a choice index or the choice's text"}.get(key, "text")
        raise RecipeError(f"{where}: field {name!r} must be {expected}, got {shown(value)}")
    for text in (value if isinstance(value, list) else [value]):
        if isinstance(text, str) and not text.isascii() and _SURROGATE.search(text):
            # JSON's "\ud800" escape gives a lone surrogate: not text, and the tokenizer's Rust side refuses it
            raise RecipeError(f"{where}: field {name!r} holds a lone surrogate "
                              f"({_SURROGATE.search(text).group()!a}), which is not text")
    return value


def _fields(**given: str | None) -> dict[str, str | None]:
    return {key: given.get(key) for key in FIELD_KEYS}


@data_adapter("jsonl")
def jsonl(path: Path, text_field: str | None = None, text_pair_field: str | None = None,
          label_field: str | None = None, prompt_field: str | None = None, choices_field: str | None = None,
          answer_field: str | None = None, max_length: int | None = None, *, context: object = None) -> Source:
    """One JSON object per line (blank lines skipped)."""
    where = getattr(context, "where", "data")
    columns = _Columns(path, _fields(text_field=text_field, text_pair_field=text_pair_field,
                                     label_field=label_field, prompt_field=prompt_field,
                                     choices_field=choices_field, answer_field=answer_field), context)
    for number, line in _lines(path, where):
        if not line.strip():
            continue
        try:
            row = _DECODER.decode(line)
        except json.JSONDecodeError as error:
            raise RecipeError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") from None
        except RecursionError:
            raise RecipeError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise RecipeError(f"{path}:{number}: expected a JSON object, got a {type(row).__name__}")
        columns.add(row, number)
    return columns.records(max_length, where)


@data_adapter("csv")
def csv_file(path: Path, text_field: str | None = None, text_pair_field: str | None = None,
             label_field: str | None = None, prompt_field: str | None = None, choices_field: str | None = None,
             answer_field: str | None = None, max_length: int | None = None, delimiter: str = ",", *,
             context: object = None) -> Source:
    """A header row naming the columns, then one example per row (a ``choices_field`` cell holds a JSON list)."""
    import csv

    where = getattr(context, "where", "data")
    if len(delimiter) != 1:
        raise RecipeError(f"{where}.delimiter: expected one character, got {shown(delimiter)}")
    if delimiter in "\r\n\"\0":
        raise RecipeError(f"{where}.delimiter: a quote, NUL or line break cannot separate cells")
    fields = _fields(text_field=text_field, text_pair_field=text_pair_field, label_field=label_field,
                     prompt_field=prompt_field, choices_field=choices_field, answer_field=answer_field)
    columns = _Columns(path, fields, context)
    numbered = _lines(path, where)
    line_of: list[int] = [0]

    def text_lines() -> Iterator[str]:
        for number, line in numbered:
            line_of[0] = number
            yield line

    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_LINE_BYTES)  # a quoted cell may span lines; each cell stays bounded
    try:
        reader = csv.reader(text_lines(), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise RecipeError(f"{path}: empty CSV file (expected a header row)") from None
        for key, name in columns.named.items():
            if name not in header:
                raise RecipeError(f"{path}:1: no field {name!r} ({key}); the header has {shown(header[:8], 120)}")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise RecipeError(f"{path}:{line_of[0]}: {len(row)} cells but the header has {len(header)}")
            columns.add(dict(zip(header, row)), line_of[0])
    except csv.Error as error:
        raise RecipeError(f"{path}:{line_of[0]}: {error}") from None
    finally:
        csv.field_size_limit(limit)
    return columns.records(max_length, where)


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

            raise RecipeError(f"{where}.split: {unknown_choice('split', str(split), list(loaded))}")
        loaded = loaded[split]
    columns = _Columns(path, _fields(text_field=text_field, text_pair_field=text_pair_field,
                                     label_field=label_field, prompt_field=prompt_field,
                                     choices_field=choices_field, answer_field=answer_field), context, "row")
    for key, name in columns.named.items():
        if name not in loaded.column_names:
            raise RecipeError(f"{path}: no column {name!r} ({key}); the dataset has "
                              f"{shown(sorted(loaded.column_names)[:8], 120)}")
    loaded = loaded.select_columns(sorted(set(columns.named.values())))  # never decode other columns (images)
    for number, row in enumerate(loaded):
        columns.add(row, number)
    return columns.records(max_length, where)


def _lines(path: Path, where: str) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line of ``path``, streamed: each line bounded, UTF-8, without NUL bytes."""
    if not path.is_file():
        raise RecipeError(f"{where}.path: {path} is not a file")
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below; a generator)
    except OSError as error:
        raise RecipeError(f"{where}.path: cannot read {path}: {error.strerror or error}") from None
    with handle:
        number = 0
        while True:
            try:
                raw = handle.readline(MAX_LINE_BYTES + 1)
            except OSError as error:
                raise RecipeError(f"{path}: cannot read: {error.strerror or error}") from None
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise RecipeError(f"{path}:{number}: line longer than {MAX_LINE_BYTES >> 20} MiB; one example "
                                  "per line, each at most that long")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            nul = raw.find(b"\0")
            if nul >= 0:
                raise RecipeError(f"{path}:{number}: a NUL byte at column {nul + 1} (not a text file)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise RecipeError(f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line)") from None
            yield number, text
