"""Inputs that look hostile but are valid, and must work: files written by real ``torch.save`` / ``safetensors``
(Lightning checkpoints whose hyperparameters hold an Enum, a functools.partial, a Decimal and a compiled regex; zips
written with CRC32 disabled; a non-UTF-8 file name; metadata nested deeper than Python's stack; Hugging Face cache
layouts whose index and shards are symlinks into ``blobs/``), and the library's in-memory path naming the tensors
a merge cannot read or write.
"""

from __future__ import annotations

import argparse
import decimal
import enum
import functools
import json
import logging
import os
import re
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.errors import CheckpointError, OutputError
from soupkit.io import open_checkpoint, save_checkpoint
from tests.conftest import snapshot
from tests.hostile.corpus import Workspace, small_state

SOUPKIT = Path(sys.executable).with_name("soupkit")


class Precision(enum.Enum):
    HALF = "16-mixed"
    FULL = "32"


def activation(x: float, slope: float = 0.1) -> float:
    return x * slope


def lightning_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """What Lightning saves: the weights plus hyperparameters of types the restricted unpickler cannot import."""
    hparams = {"precision": Precision.HALF, "act": functools.partial(activation, slope=0.2),
               "lr": decimal.Decimal("0.0003"), "pattern": re.compile(r"layer\.\d+", re.IGNORECASE),
               # and what else hyperparameters hold: argparse / SimpleNamespace, a logger, a path, typing generics
               "args": argparse.Namespace(batch_size=32), "extra": types.SimpleNamespace(seed=1),
               "logger": logging.getLogger("train"), "root": Path("/runs/1"), "kind": dict[str, typing.Any]}
    return {"state_dict": state, "hyper_parameters": hparams, "epoch": 3, "global_step": 120,
            "pytorch-lightning_version": "2.4.0"}


@pytest.mark.parametrize("legacy", [False, True])
def test_lightning_hparams_with_enum_partial_decimal_regex_load(tmp_path: Path, cli, legacy: bool) -> None:
    a, b = small_state(1), small_state(2)
    for name, state in (("a.ckpt", a), ("b.ckpt", b)):
        torch.save(lightning_checkpoint(state), tmp_path / name, _use_new_zipfile_serialization=not legacy)
    result = cli("merge", tmp_path / "a.ckpt", tmp_path / "b.ckpt", "-o", tmp_path / "soup.safetensors")
    assert result.code == 0, result.err
    soup = load_file(str(tmp_path / "soup.safetensors"))
    torch.testing.assert_close(soup["layer.weight"], (a["layer.weight"] + b["layer.weight"]) / 2)
    from soupkit.io.safe_pickle import Opaque, open_lazy

    with open_lazy(tmp_path / "a.ckpt") as lazy:  # recorded, never called: inert stand-ins
        hparams = lazy.obj["hyper_parameters"]
        assert all(isinstance(hparams[k], Opaque) for k in ("precision", "act", "lr", "pattern"))
        assert hparams["precision"].called and hparams["precision"].qualname == "Precision"


def test_dangerous_calls_in_hparams_are_still_refused(tmp_path: Path) -> None:
    from tests.hostile.corpus import Call

    canary = tmp_path / "CANARY"
    checkpoint = lightning_checkpoint(small_state())
    checkpoint["hyper_parameters"]["hook"] = Call(os.system, f"touch {canary}")
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"refusing to load: the pickle calls (posix|nt)\.system"):
        open_checkpoint(tmp_path / "evil.ckpt")
    assert not canary.exists()


@pytest.mark.parametrize("qualname", ["importlib.import_module", "shutil.rmtree", "torch.hub.load",
                                      "operator.methodcaller", "pickle.loads", "socket.create_connection"])
def test_calls_reaching_the_system_are_refused_by_name(tmp_path: Path, qualname: str) -> None:
    module, name = qualname.rsplit(".", 1)
    path = tmp_path / "call.pkl"
    path.write_bytes(b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nX\x01\x00\x00\x00x\x85R.")
    with pytest.raises(CheckpointError, match=f"the pickle calls {re.escape(qualname)}"):
        open_checkpoint(path)


def test_zip_written_without_crc32_reads(tmp_path: Path) -> None:
    state = small_state(3)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, tmp_path / "nocrc.pt", _use_new_zipfile_serialization=True)
    finally:
        torch.serialization.set_crc32_options(True)
    import zipfile

    with zipfile.ZipFile(tmp_path / "nocrc.pt") as archive:
        assert {info.CRC for info in archive.infolist()} == {0}  # what makes zipfile.read() fail
    loaded = soupkit.load_checkpoint(tmp_path / "nocrc.pt")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_compressed_records_within_deflate_bounds_still_read(tmp_path: Path) -> None:
    """A .pt re-zipped with deflate (all zeros: ~1000:1, the most deflate reaches) is not a bomb."""
    import zipfile

    from tests.hostile.corpus import torch_zip_bytes
    from tests.hostile.corpus_bombs import rezip

    state = {"zeros": torch.zeros(1 << 20), **small_state()}
    data = rezip(torch_zip_bytes(state), compress={"data.pkl": zipfile.ZIP_DEFLATED, "data/0": zipfile.ZIP_DEFLATED,
                                                   "data/1": zipfile.ZIP_BZIP2})
    (tmp_path / "deflated.pt").write_bytes(data)
    loaded = soupkit.load_checkpoint(tmp_path / "deflated.pt")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_non_utf8_file_name_merges_with_readable_provenance(tmp_path: Path, cli) -> None:
    a = tmp_path / os.fsdecode(b"caf\xe9.safetensors")  # Latin-1 bytes: not UTF-8
    save_file(small_state(1), str(a))
    b = Workspace(tmp_path).good("b.safetensors", 2)
    result = cli("merge", a, b, "-o", tmp_path / "soup.safetensors")
    assert result.code == 0, result.err
    metadata = open_checkpoint(tmp_path / "soup.safetensors").metadata
    names = [item["name"] for item in json.loads(metadata["soupkit.ingredients"])]
    assert names == ["caf\\xe9.safetensors", "b.safetensors"]


@pytest.mark.parametrize("depth", [990, 100_000])
@pytest.mark.parametrize("as_json", [False, True])
def test_deeply_nested_metadata_value_inspects(tmp_path: Path, cli, depth: int, as_json: bool) -> None:
    path = tmp_path / "deep.safetensors"
    save_file(small_state(), str(path), metadata={"deep": "[" * depth + "]" * depth, "ok": '{"a": 1}'})
    before = snapshot(tmp_path)
    result = cli("inspect", path, *(["--json"] if as_json else []))
    assert result.code == 0 and "Traceback" not in result.err, result.err
    assert snapshot(tmp_path) == before


def test_surrogate_key_is_kept_faithfully_in_pt_outputs(tmp_path: Path, cli) -> None:
    """safetensors cannot store the key (the corpus shows the one-line error); a .pt output keeps it exactly."""
    state = small_state()
    state["bad\udc80key"] = state.pop("layer.bias")
    torch.save(state, tmp_path / "in.pt")
    result = cli("convert", tmp_path / "in.pt", tmp_path / "out.pt")
    assert result.code == 0, result.err
    assert set(soupkit.load_checkpoint(tmp_path / "out.pt")) == set(state)
    with pytest.raises(OutputError, match=r"tensor key 'bad\\udc80key' is not valid Unicode"):
        save_checkpoint(state, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# --- the symlink policy: what it still accepts ---------------------------------------------------------------------


def test_shards_symlinked_inside_the_folder_are_read(tmp_path: Path) -> None:
    index = save_checkpoint(small_state(1), tmp_path / "model" / "model.safetensors", shard_size=40)
    shard = sorted(index.parent.glob("model-0*.safetensors"))[0]
    real = shard.with_name("real-" + shard.name)
    shard.rename(real)
    shard.symlink_to(real.name)
    loaded = soupkit.load_checkpoint(index)
    assert all(torch.equal(loaded[k], v) for k, v in small_state(1).items())


def test_hugging_face_cache_layout_is_read(tmp_path: Path) -> None:
    """snapshots/<rev>/{index, shards} are symlinks into blobs/: the shards resolve into the folder the index
    itself resolves into, which the policy accepts."""
    index = save_checkpoint(small_state(1), tmp_path / "blobs" / "model.safetensors", shard_size=40)
    snapshot_dir = tmp_path / "snapshots" / "abc123"
    snapshot_dir.mkdir(parents=True)
    for blob in index.parent.iterdir():
        hashed = blob.with_name(f"{abs(hash(blob.name)):x}")
        blob.rename(hashed)
        (snapshot_dir / blob.name).symlink_to(Path("..", "..", "blobs", hashed.name))
    loaded = soupkit.load_checkpoint(snapshot_dir / index.name)
    assert all(torch.equal(loaded[k], v) for k, v in small_state(1).items())
    assert soupkit.load_checkpoint(snapshot_dir)  # the folder form too


# --- in-memory state dicts (library) -------------------------------------------------------------------------------

IN_MEMORY = {
    "sparse": (lambda: torch.eye(3).to_sparse(), "sparse_coo tensor"),
    "sparse_csr": (lambda: torch.eye(3).to_sparse_csr(), "sparse_csr tensor"),
    "meta": (lambda: torch.empty(4, 3, device="meta"), "meta device"),
    "complex": (lambda: torch.randn(4, 3, dtype=torch.complex64), "complex"),
    "quantized": (lambda: torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8), "quantized tensor"),
    # 4.5 PB claimed over 4 bytes: refused before a merge plans 2**30 chunks or a writer materialises it
    "expanded": (lambda: torch.zeros(1).expand(2**25, 2**25), "view of 4 stored bytes"),
}


@pytest.mark.parametrize("kind", sorted(IN_MEMORY))
def test_in_memory_tensors_a_merge_cannot_read_are_named(tmp_path: Path, kind: str) -> None:
    make, needle = IN_MEMORY[kind]
    bad = {**small_state(1), "layer.weight": make()}
    with pytest.raises(CheckpointError, match=f"tensor 'layer.weight' .*{needle}"):
        soupkit.merge([small_state(2), bad], output=tmp_path / "soup.safetensors")
    assert not (tmp_path / "soup.safetensors").exists()


@pytest.mark.parametrize("kind", ["sparse", "sparse_csr", "meta", "quantized", "expanded"])
def test_save_checkpoint_names_tensors_it_cannot_write(tmp_path: Path, kind: str) -> None:
    make, needle = IN_MEMORY[kind]
    with pytest.raises(CheckpointError, match=f"tensor 'layer.weight' .*{needle}"):
        save_checkpoint({**small_state(), "layer.weight": make()}, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []
