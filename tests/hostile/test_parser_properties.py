"""Property tests (hypothesis) of the parsers that meet hostile input first (issue 13):

- the safetensors header reader, over arbitrary shapes, offsets, dtypes, key strings and metadata: it either
  opens the file and then every tensor reads back with the shape and byte count the header claims, or it raises
  one ``CheckpointError`` line naming the file. No other exception, no allocation beyond the file;
- ``parse_alphas``, ``parse_size`` and ``parse_float_list`` over arbitrary strings and floats: a value is
  returned only when it is finite and within bounds, anything else is one ``ParameterError`` naming the option.

Kept fast: ~200 examples each, no deadline (the machine is shared).
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from soupkit.errors import CheckpointError, ParameterError
from soupkit.options_parse import MAX_SIZE, parse_float_list, parse_size
from soupkit.soups.alphas import MAX_ALPHAS, parse_alphas
from tests.hostile.corpus import valid_safetensors

HOSTILE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- safetensors headers -----------------------------------------------------------------------------------------

CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "F8_E4M3", "F8_E5M2", "U16",
         "U32", "U64"]
#: JSON values a field may hold instead of the right thing
JUNK = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=4),
                 st.integers(-(2**65), 2**65), st.just([]), st.just({}))
DIMENSION = st.one_of(st.integers(0, 5), st.integers(0, 2**64), st.sampled_from([0, 2**31, 2**62, 2**63]), JUNK)


#: tensor names: any text, plus what hypothesis' text() leaves out or rarely draws (lone surrogates, which JSON can
#: escape; control characters; the reserved name)
KEYS = st.one_of(st.text(max_size=6), st.sampled_from(["\ud800", "a\udc80b", "", "\n", "\x00", "__metadata__",
                                                      "é" * 3, "k" * 300]))


@st.composite
def header_entry(draw: st.DrawFn, offset: int) -> tuple[dict, int]:
    """One entry, usually consistent (so the reader gets past the first check), sometimes not at all."""
    code = draw(st.one_of(st.sampled_from(CODES), JUNK)) if draw(st.booleans()) else draw(st.sampled_from(CODES))
    if draw(st.integers(0, 3)):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
    else:
        shape = draw(st.one_of(st.lists(DIMENSION, max_size=4), JUNK))
    size = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2}.get(code, 1) if isinstance(code, str) else 1
    nbytes = math.prod(d for d in shape if type(d) is int) * size if isinstance(shape, list) else 0
    nbytes = nbytes if 0 <= nbytes < 1 << 12 else 4
    if draw(st.integers(0, 3)):
        offsets = [offset, offset + nbytes]
    else:
        offsets = draw(st.one_of(st.lists(st.one_of(st.integers(-5, 2**64), JUNK), max_size=3), JUNK))
    return {"dtype": code, "shape": shape, "data_offsets": offsets}, nbytes


@st.composite
def safetensors_file(draw: st.DrawFn) -> bytes:
    header: dict = {}
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        key = draw(KEYS)
        entry, nbytes = draw(header_entry(offset))
        header[key] = entry
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(
            st.dictionaries(st.text(max_size=4), st.text(max_size=8), max_size=3),
            st.dictionaries(st.text(max_size=4), JUNK, max_size=2), JUNK))
    raw = json.dumps(header).encode()
    data = bytes(draw(st.integers(0, offset + 8)))
    claimed = len(raw) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", claimed) + raw + data


def test_drawn_headers_reach_both_branches() -> None:
    """The property below must exercise both branches: some drawn files open, most are refused."""
    from soupkit.io.safetensors_io import SafetensorsReader

    outcomes: list[bool] = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "drawn.safetensors"

        @settings(max_examples=150, deadline=None, database=None)
        @given(safetensors_file())
        def draw(data: bytes) -> None:
            path.write_bytes(data)
            try:
                SafetensorsReader(path).close()
                outcomes.append(True)
            except CheckpointError:
                outcomes.append(False)

        draw()
    assert 0.02 < sum(outcomes) / len(outcomes) < 0.98, sum(outcomes)  # ~10% open with this strategy


@HOSTILE
@given(safetensors_file())
@example(valid_safetensors())
def test_safetensors_reader_opens_consistently_or_names_the_file(data: bytes) -> None:
    from soupkit.io.safetensors_io import SafetensorsReader

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "drawn.safetensors"
        path.write_bytes(data)
        try:
            reader = SafetensorsReader(path)
        except CheckpointError as error:
            assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
            return
        with reader:
            for key in reader.keys():
                info = reader.info(key)
                assert all(type(d) is int and d >= 0 for d in info.shape)
                assert not info.dtype.is_complex
                tensor = reader.get(key)
                assert tuple(tensor.shape) == info.shape and tensor.dtype == info.dtype
                assert tensor.numel() * tensor.element_size() == info.nbytes <= len(data)
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in reader.metadata.items())


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**62, 4], [2**62, 4], [True, 3], [3, False], [2**31] * 4])
def test_safetensors_absurd_shapes_are_refused(tmp_path: Path, shape: list) -> None:
    from soupkit.io.safetensors_io import SafetensorsReader

    raw = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="tensor 'a': (bad shape|shape .* is impossibly large)"):
        SafetensorsReader(path)


# --- option parsers ----------------------------------------------------------------------------------------------

NUMBER_TEXT = st.one_of(
    st.floats().map(repr), st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "1e-400", "0x10", "1_000", " 2 ", "", "-0", "+.5"]),
)


@HOSTILE
@given(st.one_of(st.text(max_size=20), st.lists(NUMBER_TEXT, min_size=1, max_size=4).map(",".join),
                 st.tuples(NUMBER_TEXT, NUMBER_TEXT, NUMBER_TEXT).map(":".join)))
def test_parse_alphas_is_finite_bounded_or_refused(text: str) -> None:
    try:
        values = parse_alphas(text)
    except ParameterError as error:
        assert str(error).startswith("--alpha: ") and "\n" not in str(error)
        return
    assert 1 <= len(values) <= MAX_ALPHAS
    assert all(math.isfinite(v) for v in values) and len(set(values)) == len(values)


@HOSTILE
@given(st.one_of(st.floats(), st.lists(st.floats(), max_size=5)))
def test_parse_alphas_from_floats(value: float | list[float]) -> None:
    try:
        values = parse_alphas(value)
    except ParameterError:
        finite = [value] if isinstance(value, float) else value
        assert not finite or not all(math.isfinite(v) for v in finite) or len(set(finite)) != len(finite)
        return
    assert values == ([value] if isinstance(value, float) else value)


SIZE_TEXT = st.one_of(
    st.text(max_size=12),
    st.tuples(NUMBER_TEXT, st.sampled_from(["", "B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "PB", "gb"]))
    .map("".join),
)


@HOSTILE
@given(st.one_of(SIZE_TEXT, st.integers(-(2**70), 2**70)))
def test_parse_size_is_positive_bounded_or_refused(value: str | int) -> None:
    try:
        size = parse_size(value, "--shard-size")
    except ParameterError as error:
        assert str(error).startswith("--shard-size: ") and "\n" not in str(error)
        return
    assert type(size) is int and 0 < size <= MAX_SIZE


@pytest.mark.parametrize("text", ["inf", "1e400GB", "nan", "-inf", "1e30", "10000TB", "9007199254740993"])
def test_parse_size_refuses_non_finite_and_absurd(text: str) -> None:
    with pytest.raises(ParameterError, match="^--shard-size: "):
        parse_size(text, "--shard-size")


def test_parse_size_keeps_real_sizes() -> None:
    assert parse_size("5GB", "-s") == 5 * 10**9 and parse_size("2GiB", "-s") == 2 << 30
    assert parse_size(" 1.5 mb ", "-s") == 1_500_000 and parse_size(4096, "-s") == 4096
    assert parse_size(f"{2**53}", "-s") == MAX_SIZE


@HOSTILE
@given(st.one_of(st.text(max_size=20), st.lists(NUMBER_TEXT, max_size=5).map(",".join)))
def test_parse_float_list_is_finite_or_refused(text: str) -> None:
    try:
        values = parse_float_list(text, "--weights")
    except ParameterError as error:
        assert str(error).startswith("--weights: ") and "\n" not in str(error)
        return
    assert all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("text", ["nan,1", "1,inf", "-inf", "1e400"])
def test_parse_float_list_refuses_non_finite(text: str) -> None:
    with pytest.raises(ParameterError, match="^--weights: values must be finite"):
        parse_float_list(text, "--weights")


def test_cli_module_re_exports_the_library_parsers() -> None:
    from soupkit import options_parse
    from soupkit.cli import _app

    assert _app.parse_size is options_parse.parse_size and _app.parse_float_list is options_parse.parse_float_list
