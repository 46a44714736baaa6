"""Fuzz the data, cache and tokenizer-file readers (issues 22 and 26): mutated valid JSONL, CSV, score-cache
entries and tokenizer.json files, byte-level (``tests.fuzz.mutations.byte_edit``) and structure-aware (JSON
values swapped for hostile ones). Every outcome but success or a one-line ``SoupkitError`` naming the file is a
finding; a cache entry is served only when it is exactly what was stored (anything else is a miss). Fixed,
derandomised budget per target; deselect with ``-m 'not slow'``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soupkit.errors import SoupkitError
from tests.fuzz.mutations import apply_byte_edit, byte_edit

EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

ROWS = [{"text": "good film", "label": 1, "q": "one two ", "c": ["three", "four"], "a": 0},
        {"text": "bad plot", "label": "neg", "q": "", "c": ["x"], "a": "x"}]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
CSV = b'text,label,q,c,a\ngood film,1,one ,"[""two"", ""three""]",0\n"bad, plot",0,,"[""x""]",x\n'
TOKENIZER = json.dumps({"normalizer": {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                            {"type": "Split", "pattern": {"Regex": "[a-z]+|\\d{1,3}"}, "behavior": "Isolated"},
                            {"type": "Whitespace"}]}}).encode()
HOSTILE_VALUES = [None, True, -1, 2**63, 10**30, 1.5, float("inf"), "", "x" * 300, [], [1], [[[]]], {}, {"a": 1},
                  ["a", 1], "²", "٣", "\x00", "\ud800"]


@st.composite
def mutation(draw: st.DrawFn) -> tuple:
    if draw(st.booleans()):
        return "bytes", draw(st.lists(byte_edit(), min_size=1, max_size=4))
    return "value", draw(st.integers(0, 1)), draw(st.sampled_from(["text", "label", "q", "c", "a", "zz"])), \
        draw(st.sampled_from(range(len(HOSTILE_VALUES))))


def _mutated_jsonl(change: tuple) -> bytes:
    if change[0] == "bytes":
        data = JSONL
        for edit in change[1]:
            data = apply_byte_edit(data, edit)
        return data
    _, row, field, value = change
    rows = [dict(r) for r in ROWS]
    rows[row][field] = HOSTILE_VALUES[value]
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")


def _read(path: Path, kind: str) -> None:
    from soupkit.eval.data import text

    fields = ({"text_field": "text", "label_field": "label"} if kind.endswith("classify")
              else {"prompt_field": "q", "choices_field": "c", "answer_field": "a"})
    reader = text.jsonl if kind.startswith("jsonl") else text.csv_file
    try:
        source = reader(path, **fields)
    except SoupkitError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, message
        return
    records = source.text
    for key, column in records.columns.items():
        assert len(column) == len(records)
        for value in column:
            assert isinstance(value, (str, int, list)) and not isinstance(value, bool), (key, value)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jsonl classify", "jsonl choice", "csv classify", "csv choice"])
def test_fuzz_text_readers(kind: str, tmp_path: Path) -> None:
    path = tmp_path / ("data.jsonl" if kind.startswith("jsonl") else "data.csv")

    @FUZZ
    @given(change=mutation())
    def fuzz(change: tuple) -> None:
        if kind.startswith("jsonl"):
            data = _mutated_jsonl(change)
        else:
            data = CSV
            for edit in change[1] if change[0] == "bytes" else []:
                data = apply_byte_edit(data, edit)
        path.write_bytes(data)
        _read(path, kind)

    fuzz()


@pytest.mark.slow
def test_fuzz_score_cache_entries(tmp_path: Path) -> None:
    """A mutated entry is either served exactly as stored or is a miss; never an exception."""
    from soupkit.eval.cache import ScoreCache

    cache = ScoreCache(tmp_path)
    mask = torch.tensor([True, False, True, True, False, False, True, False, True])
    cache.put("ck", "key", correct=int(mask.sum()), n=len(mask), loss=0.25, mask=mask, seconds=1.0, dataset="d")
    entry = next(tmp_path.rglob("*.json"))
    original = entry.read_bytes()

    @FUZZ
    @given(edits=st.lists(byte_edit(), min_size=1, max_size=4))
    def fuzz(edits: list) -> None:
        data = original
        for edit in edits:
            data = apply_byte_edit(data, edit)
        entry.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = cache.get("ck", "key")
        if got is not None:  # only an edit that changed nothing that matters (whitespace) may be served
            assert torch.equal(got["correct_mask"], mask) and got["correct"] == int(mask.sum())
            assert got["n"] == len(mask) and got["loss"] == 0.25

    fuzz()


@pytest.mark.slow
def test_fuzz_tokenizer_files(tmp_path: Path) -> None:
    from soupkit.eval.tokenizer_check import check_tokenizer_files

    path = tmp_path / "tokenizer.json"

    @FUZZ
    @given(edits=st.lists(byte_edit(), min_size=1, max_size=4))
    def fuzz(edits: list) -> None:
        data = TOKENIZER
        for edit in edits:
            data = apply_byte_edit(data, edit)
        path.write_bytes(data)
        try:
            check_tokenizer_files(tmp_path, "model.path")
        except SoupkitError as error:
            assert "\n" not in str(error) and str(path) in str(error), str(error)

    fuzz()
