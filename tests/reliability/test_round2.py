"""Issue 13 beyond the bad-input corpus: inputs that look hostile but are valid (they must work), the library's
in-memory path, peak memory of the bombs, and interrupted ``.pt`` writes.

Valid-but-odd inputs are files written by real ``torch.save`` / ``safetensors``: Lightning checkpoints whose
hyperparameters hold an Enum, a functools.partial, a Decimal and a compiled regex; zips written with CRC32
disabled; a non-UTF-8 file name; metadata nested deeper than Python's stack; Hugging Face cache layouts whose
index and shards are symlinks into ``blobs/``.
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
import signal
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkit
from benchmarks.child_peak import peak
from soupkit.errors import CheckpointError, OutputError
from soupkit.io import open_checkpoint, save_checkpoint
from tests.conftest import snapshot
from tests.reliability.corpus import Workspace, small_state
from tests.reliability.corpus_round2 import BOMBS
from tests.reliability.test_corpus import build

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
    from tests.reliability.corpus import Call

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

    from tests.reliability.corpus import torch_zip_bytes
    from tests.reliability.corpus_round2 import rezip

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
}


@pytest.mark.parametrize("kind", sorted(IN_MEMORY))
def test_in_memory_tensors_a_merge_cannot_read_are_named(tmp_path: Path, kind: str) -> None:
    make, needle = IN_MEMORY[kind]
    bad = {**small_state(1), "layer.weight": make()}
    with pytest.raises(CheckpointError, match=f"tensor 'layer.weight' .*{needle}"):
        soupkit.merge([small_state(2), bad], output=tmp_path / "soup.safetensors")
    assert not (tmp_path / "soup.safetensors").exists()


@pytest.mark.parametrize("kind", ["sparse", "sparse_csr", "meta", "quantized"])
def test_save_checkpoint_names_tensors_it_cannot_write(tmp_path: Path, kind: str) -> None:
    make, needle = IN_MEMORY[kind]
    with pytest.raises(CheckpointError, match=f"tensor 'layer.weight' .*{needle}"):
        save_checkpoint({**small_state(), "layer.weight": make()}, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- peak memory of the bombs ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_bombs_stay_within_bounded_memory_and_time(tmp_path: Path) -> None:
    """Every bomb in the corpus, run through the CLI in one process: peak RSS stays within 300 MB of a plain
    small merge in another process (torch's own footprint cancels out), and all of them read and write little
    more than the plain merge (no bomb is read through or expanded on disk)."""
    argvs = []
    for number, name in enumerate(BOMBS):
        argvs.append(build(name, tmp_path / f"bomb{number}").argv)
    w = Workspace(tmp_path / "plain")
    w.root.mkdir()
    plain = [["merge", str(w.good("a.safetensors", 1)), str(w.good("b.safetensors", 2)), "-o", w.out]]
    baseline = peak(plain, tmp_path)
    bombs = peak(argvs, tmp_path)
    assert baseline["codes"] == [0] and bombs["codes"] == [2] * len(BOMBS), bombs
    assert bombs["rss_kb"] - baseline["rss_kb"] < 300_000, (bombs, baseline)
    assert bombs["io_bytes"] - baseline["io_bytes"] < 64 << 20, (bombs, baseline)


# --- interrupted .pt writes ----------------------------------------------------------------------------------------


class _SignalOnWrite:
    """A file whose first write past ``after`` bytes sends this process ``signum`` (a real signal, as Ctrl-C or
    `kill` would): the handler runs inside torch.save's zip writer."""

    def __init__(self, handle, signum: int, after: int):
        self._handle, self._signum, self._left = handle, signum, after

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self._left is not None and size > self._left:
            self._left = None
            os.kill(os.getpid(), self._signum)  # the handler records it at the next bytecode boundary, here
        elif self._left is not None:
            self._left -= size
        return self._handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                       (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("after", [0, 3000])
def test_signal_while_writing_leaves_one_line_and_nothing_behind(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch,
                                                                 suffix: str, signum: int, code: int, word: str,
                                                                 after: int) -> None:
    from soupkit.io import atomic

    w = Workspace(tmp_path)
    state = {**small_state(1), "big": torch.randn(20_000)}
    a = w.good("a.safetensors", state=state)
    b = w.good("b.safetensors", state={k: v + 1 if v.is_floating_point() else v for k, v in state.items()})
    original = atomic.OutputSet.open
    monkeypatch.setattr(atomic.OutputSet, "open",
                        lambda self, path: _SignalOnWrite(original(self, path), signum, after))
    previous = signal.getsignal(signal.SIGTERM)
    before = snapshot(tmp_path)
    try:
        result = cli("merge", a, b, "-o", tmp_path / f"soup{suffix}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.code == code, result.err
    assert result.err.strip() == f"soupkit merge: {word}", result.err
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not SOUPKIT.exists(), reason="the soupkit console script is not installed beside python")
def test_ctrl_c_during_start_up_prints_one_line(tmp_path: Path) -> None:
    """SIGINT at several moments of start-up (imports of typer and rich; then the command): never a traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    for delay in (0.15, 0.3, 0.6):
        process = subprocess.Popen([str(SOUPKIT), "inspect", str(tmp_path / "none.safetensors")], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        if process.returncode == 130:
            assert err.strip() in ("soupkit: interrupted", "soupkit inspect: interrupted"), err
        else:  # it had already finished: the missing file's one line
            assert process.returncode == 2 and len(err.strip().splitlines()) == 1, err
