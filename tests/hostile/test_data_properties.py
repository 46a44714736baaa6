"""Property tests (hypothesis) over text data rows (issue 22): arbitrary JSON values in every field of a JSONL
classification or multiple-choice dataset, and arbitrary cell text in a CSV. Either the rows are read and
tokenised and every label / answer is what the row says (checked against an oracle written here), or one
``RecipeError`` line names the file and the line of a row the oracle rejects. Never another exception.
Kept fast: ~150 examples each, no deadline (the machine is shared)."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from soupkit.errors import RecipeError

PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LABEL2ID = {"neg": 0, "pos": 1}
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(2**70), 2**70),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                   st.sampled_from(["neg", "pos", "0", "1", " 1 ", "²", "٣", "-0", "1" * 30]),
                   st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                               max_size=2))
TEXTS = st.one_of(st.text(max_size=40), st.sampled_from(["good film", "", " ", "the plot\nwas\tdull", "a\x00b"]),
                  VALUES)


@pytest.fixture(scope="module")
def info() -> Any:
    from transformers import AutoTokenizer

    from soupkit.eval.models.transformers_models import TextInfo
    from tests.hostile.corpus_data import template

    folder = template("bert")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return TextInfo("sequence-classification", tokenizer, None, 64, int(tokenizer.pad_token_id), 2, LABEL2ID)


def _spec(where: str = "data.heldout") -> Any:
    from soupkit.eval.recipe import DatasetSpec

    return DatasetSpec(name="heldout", kind="jsonl", params={}, role="heldout", where=where)


def _label(value: Any) -> int | None:
    """The oracle: the class a label value means, or None when it means none."""
    if isinstance(value, str) and value in LABEL2ID:
        return LABEL2ID[value]
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,18}\s*", value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2:
        return value
    return None


def _valid_text(value: Any) -> bool:
    return isinstance(value, str) and not re.search("[\ud800-\udfff]", value)


@PROPERTY
@given(rows=st.lists(st.fixed_dictionaries({"text": TEXTS, "label": VALUES}), min_size=1, max_size=6))
@example(rows=[{"text": "good film", "label": "9" * 5000}])
@example(rows=[{"text": "\ud800", "label": 1}])
def test_classification_rows_are_read_exactly_or_refused_naming_a_bad_line(rows, info, tmp_path_factory) -> None:
    from soupkit.eval.data.text import jsonl
    from soupkit.eval.text import prepare_text

    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8", "surrogatepass"))
    bad = {number for number, row in enumerate(rows, 1)
           if not _valid_text(row["text"]) or _label(row["label"]) is None}
    try:
        records = jsonl(path, text_field="text", label_field="label").text
        data = prepare_text(_spec(), records, info, torch.device("cpu"), 0, 1)
    except RecipeError as error:
        message = str(error)
        assert "\n" not in message, message
        line = re.match(rf"^{re.escape(str(path))}:(\d+): ", message)
        assert line and int(line.group(1)) in bad, (message, bad)
        return
    assert not bad, (bad, rows)
    assert data.labels.tolist() == [_label(r["label"]) for r in rows]
    assert data.n == len(rows) and int(data.lengths.min()) >= 2  # [CLS] ... [SEP]


@PROPERTY
@given(cells=st.lists(st.tuples(st.text(max_size=30), st.sampled_from(["0", "1", "pos", "neg", "2", "x", "", "²"])),
                      min_size=1, max_size=6))
def test_csv_cells_round_trip_or_are_refused_naming_the_line(cells, tmp_path_factory) -> None:
    from soupkit.eval.data.text import csv_file

    buffer = io.StringIO()
    writer = csv.writer(buffer)  # "\r\n": quotes every cell holding \r or \n
    writer.writerow(["text", "label"])
    writer.writerows(cells)
    path = tmp_path_factory.mktemp("csv") / "rows.csv"
    path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
    try:
        records = csv_file(path, text_field="text", label_field="label").text
    except RecipeError as error:
        assert "\n" not in str(error) and str(error).startswith(f"{path}:"), str(error)
        assert any("\x00" in text or re.search(r"[\ud800-\udfff]", text) for text, _ in cells), (error, cells)
        return
    kept = [(t, lab) for t, lab in cells if (t.strip() or lab.strip())]  # blank rows are skipped
    assert list(zip(records.columns["text_field"], records.columns["label_field"])) == kept


TOKEN_ROWS = st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=12), min_size=1, max_size=4)


@PROPERTY
@given(examples=st.lists(TOKEN_ROWS, min_size=1, max_size=8), choice=st.booleans(), data=st.data())
def test_ragged_storage_holds_only_the_tokens_and_batches_as_a_padded_block(examples, choice, data) -> None:
    """Stored end to end (memory = the tokens, whatever the longest example), a batch is exactly the block the
    old padded layout gave: each row's tokens, then its pad value."""
    from soupkit.eval.text import _ragged

    fields = 3 if choice else 2
    examples = [[[row] * fields for row in (e if choice else e[:1])] for e in examples]
    pad = [99, 0, 0][:fields]
    packed, lengths = _ragged(examples, pad, choice)
    assert packed.tokens.shape == (sum(len(rows[0]) for e in examples for rows in e) + 1, fields)  # + the pad row
    rows = torch.tensor(data.draw(st.lists(st.integers(0, len(examples) - 1), min_size=1, max_size=5)))
    width = int(lengths[rows].max())
    batch = packed.gather(rows, width)
    choices = max(len(e) for e in examples)
    for b, i in enumerate(rows.tolist()):
        for c in range(choices if choice else 1):
            got = batch[b, c] if choice else batch[b]
            rows_c = examples[i][c] if c < len(examples[i]) else [[] for _ in range(fields)]
            for f in range(fields):
                expected = rows_c[f] + [pad[f]] * (width - len(rows_c[f]))
                assert got[f].tolist() == expected


def test_one_long_outlier_costs_its_own_tokens_only() -> None:
    from soupkit.eval.text import _pack

    rows = [[[1] * 4, [1] * 4] for _ in range(10_000)] + [[[2] * 100_000, [1] * 100_000]]
    packed, lengths = _pack(rows, [0, 0])
    assert packed.tokens.numel() == 2 * (10_000 * 4 + 100_000 + 1)  # a padded block: 2 x 10,001 x 100,000
    assert int(lengths.max()) == 100_000 and packed.gather(torch.tensor([0, 1]), 4).shape == (2, 2, 4)
