"""Fuzzing the checkpoint readers: seeds, mutations and the target, shared by the CI test
(``tests/fuzz/test_fuzz_readers.py``) and the long on-demand run (``benchmarks/fuzz_long.py``).

The target writes the mutated bytes to a file and does what any soupkit command does first: ``open_checkpoint``,
then every key's info, the whole tensor and a flat range of it, and the metadata. Every outcome except success
or a ``SoupkitError`` is a finding: another exception (a bug: users would see a traceback), a reader claiming
more memory than ``MAX_CLAIM`` for a small file (a memory bomb), or a new file in the folder (a payload ran).

Mutations work at three levels so that they reach past the first validity check: raw bytes (bit flips, byte
writes, truncation, insertion, deletion, interesting integers), structure-aware edits (a safetensors header's
JSON fields, with the length prefix kept right), and the pickle inside a torch zip (re-zipped with a correct
CRC, so the unpickler, not the zip reader, sees the damage).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.hostile.corpus import Call, valid_seeds

#: a reader that claims more bytes than this for one tensor of a file under 1 MB is a memory bomb
MAX_CLAIM = 256 << 20
INTERESTING = [0, 1, 7, 8, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**64 - 1]
DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "F8_E4M3", "U64",
               "F4", "", "f32", None, 3]
NEST = "<nested lists>"  # placeholder json.dumps cannot recurse into; replaced in the serialized header
JSON_VALUES = [None, True, -1, 0, 1, 2**40, 2**64, 1.5, "x", [], [1], [[1]], [-1, 4], [0, 2**62], {}, {"a": "b"}]


def seeds(canary: Path) -> dict[str, tuple[str, bytes]]:
    """Valid seeds in every layout, plus hostile ones whose payload would create ``canary``."""
    found = dict(valid_seeds())
    hostile = {"w": Call(os.system, f"touch {canary}"), "b": [Call(eval, f"open({str(canary)!r}, 'w')")]}
    found["hostile-pickle"] = (".pt", pickle.dumps(hostile, protocol=2))
    buffer = io.BytesIO()
    import torch

    torch.save({"state_dict": {"w": torch.ones(3)}, "hook": Call(os.system, f"touch {canary}")}, buffer)
    found["hostile-zip"] = (".pt", buffer.getvalue())
    return found


# ------------------------------------------------------------------------------------------ mutations


@st.composite
def byte_edit(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "int", "splice"]))
    where = draw(st.floats(0, 1, exclude_max=True))
    if kind == "flip":
        return kind, where, draw(st.integers(0, 7))
    if kind == "set":
        return kind, where, draw(st.integers(0, 255))
    if kind == "truncate":
        return (kind, where)
    if kind == "insert":
        return kind, where, draw(st.binary(min_size=1, max_size=16))
    if kind == "delete":
        return kind, where, draw(st.integers(1, 64))
    if kind == "int":
        return kind, where, draw(st.sampled_from(INTERESTING)), draw(st.sampled_from([1, 2, 4, 8]))
    return kind, where, draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(1, 256))


def apply_byte_edit(data: bytes, edit: tuple) -> bytes:
    kind, where = edit[0], edit[1]
    if not data:
        return data + b"\x00" if kind == "insert" else data
    at = int(where * len(data))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (1 << edit[2])]) + data[at + 1 :]
    if kind == "set":
        return data[:at] + bytes([edit[2]]) + data[at + 1 :]
    if kind == "truncate":
        return data[: max(at, 1)]  # an empty file is a corpus case already
    if kind == "insert":
        return data[:at] + edit[2] + data[at:]
    if kind == "delete":
        return data[:at] + data[at + edit[2] :]
    if kind == "int":
        value, width = edit[2], edit[3]
        raw = (value % (1 << (8 * width))).to_bytes(width, "little")
        return data[:at] + raw + data[at + width :]
    source = int(edit[2] * len(data))  # splice: copy a run of the file over another place
    return data[:at] + data[source : source + edit[3]] + data[at + edit[3] :]


@st.composite
def header_edit(draw: st.DrawFn) -> tuple:
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "metadata", "drop", "length", "rename",
                                  "nest"]))
    if field == "dtype":
        return field, draw(st.floats(0, 1, exclude_max=True)), draw(st.sampled_from(DTYPE_CODES))
    if field == "length":
        return field, draw(st.sampled_from([-8, -1, 1, 8, 2**20, 2**40]))
    if field == "nest":  # valid JSON nested deeper than any recursive parser's stack
        return field, draw(st.floats(0, 1, exclude_max=True)), draw(st.sampled_from([100, 5000, 100_000])), 0
    return field, draw(st.floats(0, 1, exclude_max=True)), draw(st.sampled_from(JSON_VALUES)), draw(
        st.integers(-2, 2))


def apply_header_edit(data: bytes, edit: tuple) -> bytes:
    """Edit a safetensors header's JSON (keeping the length prefix right, except for a 'length' edit)."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
    except (struct.error, ValueError, RecursionError):  # RecursionError: an earlier 'nest' edit
        return data
    if not isinstance(header, dict):
        return data
    body = data[8 + length :]
    field = edit[0]
    if field == "length":
        return struct.pack("<Q", max(0, length + edit[1]) % 2**64) + data[8:]
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return data
    key = keys[int(edit[1] * len(keys))]
    entry = header[key]
    if field == "dtype" and isinstance(entry, dict):
        entry["dtype"] = edit[2]
    elif field in ("shape", "data_offsets") and isinstance(entry, dict):
        value = edit[2]
        current = entry.get(field)
        if isinstance(current, list) and current and edit[3] and isinstance(value, int) and value in (0, 1, -1):
            # nudge one number: the edit that most often stays plausible
            index = abs(edit[3]) % len(current)
            current[index] = current[index] + edit[3] * (1 if value else 4) if isinstance(current[index], int) else 0
        else:
            entry[field] = value
    elif field == "entry":
        header[key] = edit[2]
    elif field == "metadata":
        header["__metadata__"] = edit[2]
    elif field == "drop" and isinstance(entry, dict):
        entry.pop(["dtype", "shape", "data_offsets"][abs(edit[3]) % 3], None)
    elif field == "rename":
        header[f"{key}\u0000{edit[3]}"] = header.pop(key)
    elif field == "nest":
        header[key] = NEST
    raw = json.dumps(header).encode()
    if field == "nest":
        raw = raw.replace(json.dumps(NEST).encode(), b"[" * edit[2] + b"]" * edit[2])
    return struct.pack("<Q", len(raw)) + raw + body


def rezip_pickle(data: bytes, edits: list[tuple]) -> bytes:
    """Apply byte edits to a torch zip's ``data.pkl`` and re-zip (valid CRCs) the archive."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as source:
            members = [(info, source.read(info)) for info in source.infolist()]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return data
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info, content in members:
            if info.filename.endswith("/data.pkl"):
                for edit in edits:
                    content = apply_byte_edit(content, edit)
            target.writestr(info, content)
    return out.getvalue()


@dataclass(frozen=True)
class Mutant:
    seed: str
    level: str  # "bytes", "header" or "pickle-in-zip"
    edits: tuple

    def build(self, seed_bytes: bytes) -> bytes:
        if self.level == "header":
            data = seed_bytes
            for edit in self.edits:
                data = apply_header_edit(data, edit) if edit[0] != "raw" else apply_byte_edit(data, edit[1])
            return data
        if self.level == "pickle-in-zip":
            return rezip_pickle(seed_bytes, list(self.edits))
        data = seed_bytes
        for edit in self.edits:
            data = apply_byte_edit(data, edit)
        return data


def mutants(seed_names: list[str]) -> st.SearchStrategy[Mutant]:
    @st.composite
    def build(draw: st.DrawFn) -> Mutant:
        seed = draw(st.sampled_from(seed_names))
        levels = ["bytes"]
        if "safetensors" in seed:
            levels.append("header")
        if "zip" in seed:
            levels.append("pickle-in-zip")
        level = draw(st.sampled_from(levels))
        if level == "header":
            edits = draw(st.lists(st.one_of(header_edit(), byte_edit().map(lambda e: ("raw", e))),
                                  min_size=1, max_size=3))
        else:
            edits = draw(st.lists(byte_edit(), min_size=1, max_size=4))
        return Mutant(seed, level, tuple(edits))

    return build()


# ------------------------------------------------------------------------------------------ the target


@dataclass
class Finding:
    """Something other than success or a SoupkitError."""

    kind: str  # "exception", "memory-bomb", "payload-ran", "multi-line message"
    detail: str


def read_everything(path: Path) -> Finding | None:
    """What soupkit does with a checkpoint, with every non-SoupkitError outcome returned as a Finding."""
    from soupkit.errors import SoupkitError
    from soupkit.io import open_checkpoint

    size = path.stat().st_size
    try:
        with open_checkpoint(path) as reader:
            _ = reader.metadata
            for key in reader.keys():
                info = reader.info(key)
                if info.nbytes > MAX_CLAIM and size < (1 << 20):
                    return Finding("memory-bomb", f"tensor {key!r} claims {info.nbytes} bytes from a "
                                                  f"{size}-byte file")
                tensor = reader.get(key)
                if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                    return Finding("exception", f"{key!r}: get() gave {tuple(tensor.shape)} {tensor.dtype}, info "
                                                f"said {info.shape} {info.dtype}")
                reader.read_flat(key, 0, min(info.numel, 3))
    except SoupkitError as error:
        message = str(error)
        if "\n" in message or "\r" in message:
            return Finding("multi-line message", message[:500])
        return None
    except RecursionError:
        return Finding("exception", "RecursionError\n" + traceback.format_exc(limit=-8))
    except Exception as error:
        return Finding("exception", f"{type(error).__name__}: {error}\n" + traceback.format_exc(limit=-8))
    return None


def run_one(mutant: Mutant, seed_files: dict[str, tuple[str, bytes]], folder: Path) -> tuple[Finding | None, bytes]:
    """Build ``mutant``, write it into the empty ``folder``, read it; check nothing else appeared there."""
    suffix, seed_bytes = seed_files[mutant.seed]
    data = mutant.build(seed_bytes)
    path = folder / f"mutant{suffix}"
    path.write_bytes(data)
    try:
        finding = read_everything(path)
    finally:
        path.unlink()
    others = [p.name for p in folder.iterdir()]
    if others:
        for extra in folder.iterdir():
            extra.unlink()
        return Finding("payload-ran", f"files appeared: {others}"), data
    return finding, data


def describe(value: Any) -> str:
    return repr(value)[:2000]
