"""Checkpoint I/O: safetensors reading/writing, shards, folders, in-memory inputs, atomic outputs."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.errors import CheckpointError, OutputError
from soupkit.io import OutputSet, check_output_path, open_checkpoint, save_checkpoint
from soupkit.io.safetensors_io import SafetensorsReader
from tests.conftest import tiny_state

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
              torch.uint8, torch.bool]


def varied_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {f"t.{str(d).split('.')[-1]}": (torch.randn(5, 7, generator=g) * 10).to(d) for d in ALL_DTYPES}
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.empty(0, 4)
    return state


def test_reader_matches_safetensors_library(tmp_path: Path) -> None:
    state = varied_state()
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={"who": "test"})
    with open_checkpoint(path) as reader:
        assert isinstance(reader, SafetensorsReader)
        assert set(reader.keys()) == set(state)
        assert reader.metadata == {"who": "test"}
        for key, tensor in state.items():
            info = reader.info(key)
            assert info.shape == tuple(tensor.shape) and info.dtype == tensor.dtype
            got = reader.get(key)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        flat = state["t.float32"].reshape(-1)
        assert torch.equal(reader.read_flat("t.float32", 3, 17), flat[3:17])


def test_writer_output_reads_back_with_safetensors_library(tmp_path: Path) -> None:
    state = varied_state()
    state["transposed"] = torch.randn(3, 4).t()  # non-contiguous input
    path = save_checkpoint(state, tmp_path / "out.safetensors", {"k": "v"})
    loaded = load_file(str(path))
    assert set(loaded) == set(state)
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["k"] == "v"
        assert handle.metadata()["format"] == "pt"


def test_sharded_write_and_read_back(tmp_path: Path) -> None:
    state = tiny_state(0)
    index = save_checkpoint(state, tmp_path / "soup.safetensors", shard_size=600)
    assert index.name == "soup.safetensors.index.json"
    shards = sorted(tmp_path.glob("soup-*-of-*.safetensors"))
    assert len(shards) > 1
    weight_map = json.loads(index.read_text())["weight_map"]
    assert set(weight_map) == set(state)
    back = soupkit.load_checkpoint(index)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # the folder resolves to its index too
    assert set(soupkit.load_checkpoint(tmp_path)) == set(state)


def test_sharded_index_with_missing_shard_is_a_clear_error(tmp_path: Path) -> None:
    index = save_checkpoint(tiny_state(0), tmp_path / "m.safetensors", shard_size=600)
    victim = sorted(tmp_path.glob("m-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{victim.name}' listed in the index does not exist"):
        open_checkpoint(index)


def test_in_memory_state_dicts_and_containers() -> None:
    state = tiny_state(1)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    reader = open_checkpoint(wrapped)
    assert reader.keys() == list(state)
    assert torch.equal(reader.get("head.weight"), state["head.weight"])


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"\x00" * 7, "too short for a header"),
    (random.Random(0).randbytes(64), None),  # seeded: the same bytes in every run (and every xdist worker)
])
def test_garbage_files_raise_checkpoint_error(tmp_path: Path, content: bytes, message: str | None) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert str(path) in str(err.value)
    if message:
        assert message in str(err.value)


def test_truncated_and_lying_headers(tmp_path: Path) -> None:
    good = save_checkpoint(tiny_state(0), tmp_path / "good.safetensors")
    raw = good.read_bytes()
    (tmp_path / "cut_data.safetensors").write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(tmp_path / "cut_data.safetensors")
    (tmp_path / "cut_header.safetensors").write_bytes(raw[:40])
    with pytest.raises(CheckpointError, match="header"):
        open_checkpoint(tmp_path / "cut_header.safetensors")
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    first = next(k for k in header if k != "__metadata__")
    header[first]["dtype"] = "F64"  # bytes no longer match shape x itemsize
    blob = json.dumps(header).encode()
    (tmp_path / "lie.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + header_len :])
    with pytest.raises(CheckpointError, match="needs .* bytes but data_offsets span"):
        open_checkpoint(tmp_path / "lie.safetensors")


def test_output_path_checks(tmp_path: Path, make_ckpt) -> None:
    source = make_ckpt("a")
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_output_path(source, inputs=[source], force=True)
    with pytest.raises(OutputError, match="exists; use --force"):
        check_output_path(source, inputs=[])
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path / "dir.safetensors", inputs=[])
    with pytest.raises(OutputError, match="must end in .safetensors"):
        check_output_path(tmp_path / "out.txt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="not writable"):
        check_output_path(locked / "x.safetensors")


def test_output_set_removes_temporaries_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with OutputSet() as files:
            files.open(target).write(b"partial")
            raise KeyboardInterrupt
    assert not target.exists() and not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_output_set_turns_enospc_into_one_line_error(tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    with pytest.raises(OutputError, match="No space left on device"):
        with OutputSet() as files:
            files.open(target)
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_changes_with_one_weight(tmp_path: Path) -> None:
    state = tiny_state(0)
    a = save_checkpoint(state, tmp_path / "a.safetensors")
    state["head.bias"] = state["head.bias"].clone()
    state["head.bias"][3] += 1e-3
    b = save_checkpoint(state, tmp_path / "b.safetensors")
    assert soupkit.fingerprint(a) != soupkit.fingerprint(b)
    assert soupkit.fingerprint(a) == soupkit.fingerprint(a)
    assert soupkit.fingerprint(tiny_state(0)) == soupkit.fingerprint(tiny_state(0))
    assert soupkit.fingerprint(tiny_state(0)) != soupkit.fingerprint(state)


def test_a_file_shrunk_after_opening_gives_a_clear_error_never_sigbus(tmp_path: Path) -> None:
    """Tensor bytes are read with pread, never through a memory map (a mapped page of a truncated file raises
    SIGBUS when touched): a range no longer in the file is a one-line CheckpointError."""
    path = tmp_path / "shrinks.safetensors"
    save_file({"big": torch.randn(300_000)}, str(path))
    reader = SafetensorsReader(path)
    assert reader.map_flat("big", 0, 300_000) is None
    os.truncate(path, 4096)
    with pytest.raises(CheckpointError, match="truncated"):
        reader.read_flat("big", 100_000, 300_000)
