"""The restricted unpickler: hostile pickles are refused without running anything, malformed files raise
``CheckpointError`` naming the file, and tensors come back lazily and exactly in all three layouts."""

from __future__ import annotations

import os
import pickle
import random
import re
import struct
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

from soupkit.errors import CheckpointError
from soupkit.io.safe_pickle import LazyTensor, Opaque, flatten_module, open_lazy
from tests.io.torch_fixtures import (
    LAYOUTS,
    Call,
    fake_tensor,
    hostile_payloads,
    make_vanishing_model,
    rewrite_zip,
    save,
    varied_state,
    write_torch_zip,
)

REFUSAL = "refusing to load: the pickle calls {}, which could run code; soupkit never executes pickled code"


def refusal(path: Path, qualname: str) -> str:
    return "^" + re.escape(f"{path}: " + REFUSAL.format(qualname)) + "$"


# --- hostile pickles --------------------------------------------------------------------------------------------

HOSTILE_NAMES = {"os.system": "posix.system", "eval": "builtins.eval", "exec": "builtins.exec",
                 "subprocess.Popen": "subprocess.Popen", "nested": "posix.system"}  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("payload", sorted(HOSTILE_NAMES))
def test_hostile_calls_are_refused_and_never_run(tmp_path: Path, payload: str, layout: str) -> None:
    canary = tmp_path / "CANARY"
    path = save(hostile_payloads(canary)[payload], tmp_path / "evil.pt", layout)
    qualname = HOSTILE_NAMES[payload] if os.name == "posix" else HOSTILE_NAMES[payload].replace("posix", "nt")
    with pytest.raises(CheckpointError, match=refusal(path, qualname)):
        open_lazy(path)
    assert not canary.exists()


def test_reduce_touching_canary_in_cwd_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = save({"w": torch.ones(1), "x": Call(os.system, "touch CANARY")}, tmp_path / "evil.pt", "pickle")
    with pytest.raises(CheckpointError, match="refusing to load: the pickle calls posix.system"):
        open_lazy(path)
    assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize(
    ("data", "qualname"),
    [
        # getattr(builtins, "eval"): the classic way around a blocklist
        (b"\x80\x02cbuiltins\ngetattr\ncbuiltins\nobject\nX\x04\x00\x00\x00evalq\x00\x86R.", "builtins.getattr"),
        (b"\x80\x02cimportlib\nimport_module\nX\x02\x00\x00\x00os\x85R.", "importlib.import_module"),
        (b"cposix\nsystem\n(S'true'\ntR.", "posix.system"),  # protocol 0
        (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.", "os.system"),  # STACK_GLOBAL
        (b"(cposix\nsystem\nS'true'\no.", "posix.system"),  # OBJ opcode with arguments calls the class
        (b"(S'true'\niposix\nsystem\n.", "posix.system"),  # INST opcode
        # a stand-in instance is fine, but calling one (REDUCE on it via copyreg.__newobj__ result) is not
        (b"\x80\x02ccopyreg\n_reconstructor\ncos\nsystem\ncbuiltins\nobject\nN\x87R)R.", None),
    ],
)
def test_handwritten_hostile_pickles(tmp_path: Path, data: bytes, qualname: str | None) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    if qualname is None:
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: "):
            open_lazy(path)
    else:
        with pytest.raises(CheckpointError, match=refusal(path, qualname)):
            open_lazy(path)


def test_unknown_classes_become_inert_stand_ins(tmp_path: Path) -> None:
    """An object of an importable class with a booby-trapped __setstate__ loads as an Opaque record; its
    code is never called, even though the class is in sys.modules."""
    canary = tmp_path / "CANARY"
    module = type(sys)("trap_module")
    exec(  # the test's own code, defining the trap
        "import pathlib\n"
        "class Trap:\n"
        f"    def __setstate__(self, state): pathlib.Path({str(canary)!r}).touch()\n"
        f"    def __init__(self, *a): pathlib.Path({str(canary)!r}).touch()\n",
        module.__dict__,
    )
    sys.modules["trap_module"] = module
    module.Trap.__module__ = "trap_module"
    try:
        trap = module.Trap.__new__(module.Trap)
        trap.__dict__["payload"] = [1, 2]
        path = save({"w": torch.ones(3), "trap": trap}, tmp_path / "trap.pkl", "pickle")
        loaded = open_lazy(path).obj
    finally:
        del sys.modules["trap_module"]
    assert not canary.exists()
    stand_in = loaded["trap"]
    assert isinstance(stand_in, Opaque)
    assert (stand_in.module, stand_in.qualname, stand_in.state) == ("trap_module", "Trap", {"payload": [1, 2]})
    assert isinstance(loaded["w"], LazyTensor)


def test_known_data_types_load_inertly(tmp_path: Path) -> None:
    """numpy scalars, datetimes and paths (common in training metadata) are recorded, not called."""
    import datetime

    import numpy as np

    extra = {"acc": np.float64(0.75), "when": datetime.datetime(2024, 1, 2), "dir": Path("/x"), "dt": torch.float16,
             "size": torch.Size([2, 3]), "dev": torch.device("cpu"), "r": range(3), "s": {1, 2}, "b": bytearray(b"xy")}
    path = save({"state_dict": {"w": torch.ones(2)}, **extra}, tmp_path / "meta.pt", "zip")
    obj = open_lazy(path).obj
    assert isinstance(obj["acc"], Opaque) and isinstance(obj["when"], Opaque) and isinstance(obj["dir"], Opaque)
    assert obj["dt"] is torch.float16 and obj["size"] == (2, 3) and obj["dev"] == torch.device("cpu")
    assert obj["r"] == range(3) and obj["s"] == {1, 2} and obj["b"] == bytearray(b"xy")


# --- malformed inputs -------------------------------------------------------------------------------------------


def expect_error(path: Path, pattern: str = "") -> None:
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: .*{pattern}") as info:
        open_lazy(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"", b"\x80", b"\x80\x02", b"\x80\x02.", b"\x80\x02K", b"garbage that is not a pickle", b"PK\x03\x04junk",
        b"\x80\x04K\x01K\x02\x93.",  # STACK_GLOBAL with integer operands
        b"\x80\x02\x82\x01.",  # EXT1 with an unregistered code
        b"\x80\x02X\x01\x00\x00\x00aQ.",  # a persistent id in a plain pickle
        b"\x80\x02cos\nsystem\n}b.",  # BUILD on a class: its __setstate__ is never bound
        b"\x80\x02c__builtin__\nset\nK\x01\x85R.",  # set(1): a TypeError inside an allowed call
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)K\x00tR.",  # a tensor without a storage
        b"\x80\x04\x95\xff\xff\xff\xff\x00\x00\x00\x00.",  # a frame longer than the file
        b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\x00\x00.",  # BINBYTES8 far past the end of the file
        # frozenset(range(2**31)): no foreign code, but it would eat memory; by REDUCE and by NEWOBJ
        b"\x80\x02c__builtin__\nfrozenset\nc__builtin__\nrange\nJ\xff\xff\xff\x7f\x85R\x85R.",
        b"\x80\x02c__builtin__\nfrozenset\nc__builtin__\nrange\nJ\xff\xff\xff\x7f\x85R\x85\x81.",
        b"\x80\x02ctorch\nSize\nc__builtin__\nrange\nJ\xff\xff\xff\x7f\x85R\x85R.",
    ],
)
def test_malformed_pickles(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    expect_error(path)


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02K\x01r\xff\xff\xff\x7f.",  # LONG_BINPUT 2**31-1: CPython would size its memo to 16 GiB
        b"I1\np+1263610993\n.",  # the same through a protocol 0 PUT, with a sign
        b"I1\np" + b" " * 100_000 + b"1263610993\n.",  # ... padded far past any fixed-size look-ahead
        b"\x80\x02S'" + b"a" * 100_000 + b"'\n0K\x01r\xff\xff\xff\x7f.",  # after a long text line
        b"\x80\x04\x95\x07\x00\x00\x00\x00\x00\x00\x00K\x01r\xff\xff\xff\x7f.",  # inside a frame
    ],
)
def test_memo_bombs_are_refused_before_unpickling(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bomb.pkl"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        expect_error(path, "memo index far beyond the 0 memo writes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes allocated: the memo was sized from the index"  # 16 GiB if it had been


def test_random_bytes(tmp_path: Path) -> None:
    rng = random.Random(0)
    for i in range(40):
        path = tmp_path / f"random{i}.pt"
        head = rng.choice([b"", b"\x80\x02", b"\x80\x04", b"PK\x03\x04"])
        path.write_bytes(head + rng.randbytes(rng.randint(0, 300)))
        expect_error(path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_files(tmp_path: Path, layout: str) -> None:
    whole = save({"a": torch.randn(300, 300), "b": torch.randn(10)}, tmp_path / "whole.pt", layout).read_bytes()
    for cut in (1, 40, len(whole) // 3, len(whole) // 2, len(whole) - 40, len(whole) - 1):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: "):
            reader = open_lazy(path)
            for tensor in reader.obj.values():  # a file cut inside the data fails at the latest when read
                tensor.materialize()


def test_zip_missing_record(tmp_path: Path) -> None:
    source = save({"a": torch.ones(3), "b": torch.zeros(2)}, tmp_path / "ok.pt", "zip")
    path = rewrite_zip(source, tmp_path / "missing.pt", lambda name, data: None if "/data/1" in name else data)
    expect_error(path, "record .*/data/1 is missing")


def test_zip_record_shorter_than_tensor(tmp_path: Path) -> None:
    source = save({"a": torch.ones(30)}, tmp_path / "ok.pt", "zip")
    path = rewrite_zip(source, tmp_path / "short.pt", lambda name, data: data[:50] if "/data/0" in name else data)
    expect_error(path, "holds 50 bytes but its storage needs 120")


@pytest.mark.parametrize(
    ("shape", "stride", "offset"),
    [((5,), (1,), 0), ((2, 2), (2, 1), 1), ((2, 2), (1, 3), 0), ((4,), (1,), 1)],
)
def test_tensor_reaching_past_its_storage(tmp_path: Path, shape: tuple, stride: tuple, offset: int) -> None:
    tensor = fake_tensor("0", "FloatStorage", 4, offset, shape, stride)
    path = write_torch_zip(tmp_path / "past.pt", {"t": tensor}, {"0": bytes(16)})
    expect_error(path, "needs .* elements but its storage holds 4")


@pytest.mark.parametrize(("shape", "stride"), [((-1,), (1,)), ((2,), (1, 1)), (("2",), (1,)), ((2,), (-1,))])
def test_malformed_tensor_metadata(tmp_path: Path, shape: tuple, stride: tuple) -> None:
    tensor = fake_tensor("0", "FloatStorage", 4, 0, shape, stride)
    expect_error(write_torch_zip(tmp_path / "meta.pt", {"t": tensor}, {"0": bytes(16)}))


def test_legacy_storage_count_mismatch(tmp_path: Path) -> None:
    data = bytearray(save({"a": torch.ones(8)}, tmp_path / "ok.pt", "legacy").read_bytes())
    header_at = len(data) - 32 - 8
    assert struct.unpack("<q", data[header_at : header_at + 8]) == (8,)
    data[header_at : header_at + 8] = struct.pack("<q", 9)
    path = tmp_path / "count.pt"
    path.write_bytes(bytes(data))
    expect_error(path, "holds 9 elements but its tensors claim 8")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_and_tar_are_named(tmp_path: Path) -> None:
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "scripted.pt"
    torch.jit.save(scripted, str(path))
    expect_error(path, "TorchScript archive")
    tar = tmp_path / "old.pt"
    tar.write_bytes(b"sys_info".ljust(257, b"\0") + b"ustar" + bytes(300))
    expect_error(tar, "tar-format")


def test_sparse_tensors_are_named(tmp_path: Path) -> None:
    path = save({"s": torch.eye(3).to_sparse()}, tmp_path / "sparse.pt", "zip")
    expect_error(path, "holds a sparse tensor")


def test_errors_close_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x80\x02cposix\nsystem\nX\x01\x00\x00\x00x\x85R.")
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(5):
        with pytest.raises(CheckpointError):
            open_lazy(path)
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


# --- what comes back --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensors_round_trip_in_every_layout(tmp_path: Path, layout: str) -> None:
    state = varied_state()
    path = save(state, tmp_path / "state.pt", layout)
    with open_lazy(path) as lazy:
        assert lazy.layout == layout and list(lazy.obj) == list(state)
        for key, tensor in state.items():
            got = lazy.obj[key].materialize()
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), key
    if layout != "pickle":
        reference = torch.load(path, weights_only=True)
        with open_lazy(path) as lazy:
            assert all(torch.equal(lazy.obj[k].materialize(), reference[k]) for k in reference)


def test_shared_storage_is_shared_lazily(tmp_path: Path) -> None:
    path = save(varied_state(), tmp_path / "state.pt", "zip")
    with open_lazy(path) as lazy:
        obj = lazy.obj
        assert obj["tied"] is obj["base"]
        assert obj["row_view"].storage is obj["base"].storage and obj["row_view"].storage_offset == 10
        assert not obj["transposed"].is_contiguous() and obj["transposed"].stride == (1, 5)


def test_big_endian_and_compressed_zip_records(tmp_path: Path) -> None:
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    big = values.numpy().astype(">f4").tobytes()
    tensor = fake_tensor("0", "FloatStorage", 3, 0, (3,), (1,))
    path = write_torch_zip(tmp_path / "big.pt", {"t": tensor}, {"0": big}, byteorder=b"big")
    with open_lazy(path) as lazy:
        assert torch.equal(lazy.obj["t"].materialize(), values)
    path = write_torch_zip(tmp_path / "deflated.pt", {"t": tensor}, {"0": values.numpy().tobytes()},
                           compression=zipfile.ZIP_DEFLATED, prefix="other_name")
    with open_lazy(path) as lazy:
        assert torch.equal(lazy.obj["t"].materialize(), values)
        assert torch.equal(lazy.obj["t"].read_flat(1, 3), values[1:])


def test_flatten_module_matches_state_dict(tmp_path: Path) -> None:
    model, forget = make_vanishing_model(tmp_path)
    path = save(model, tmp_path / "model.pt", "pickle")
    forget()
    with open_lazy(path) as lazy:
        assert isinstance(lazy.obj, Opaque) and lazy.obj.qualname == "ImageClassifier"
        flat = flatten_module(lazy.obj)
        reference = model.state_dict()
        assert flat is not None and list(flat) == list(reference)
        assert all(torch.equal(flat[k].materialize(), reference[k]) for k in reference)
        assert "image_encoder.cache" not in flat  # non-persistent buffer
    assert flatten_module(object()) is None


def test_plain_pickle_payloads_are_not_read_at_open(tmp_path: Path) -> None:
    """The storage bytes inside a pickle.dump are skipped while unpickling and read on demand."""
    weight = torch.randn(1024, 512)
    path = save({"w": weight}, tmp_path / "big.pkl", "pickle")
    with open_lazy(path) as lazy:
        source = lazy.obj["w"].storage._source
        assert source.handle is not None and len(source.prefix) < 8192  # only the payload's head was read
        assert torch.equal(lazy.obj["w"].materialize(), weight)


def test_reading_after_close_is_an_error(tmp_path: Path) -> None:
    path = save({"w": torch.ones(4)}, tmp_path / "w.pt", "zip")
    lazy = open_lazy(path)
    lazy.close()
    with pytest.raises(CheckpointError, match="closed"):
        lazy.obj["w"].materialize()


def test_protocol_0_and_5_pickles(tmp_path: Path) -> None:
    state = {"a": torch.randn(3), "b": torch.arange(4)}
    for protocol in (0, 1, 2, 5):
        path = tmp_path / f"p{protocol}.pkl"
        with open(path, "wb") as handle:
            pickle.dump(state, handle, protocol=protocol)
        with open_lazy(path) as lazy:
            assert all(torch.equal(lazy.obj[k].materialize(), state[k]) for k in state), protocol


def test_flatten_module_odd_trees(tmp_path: Path) -> None:
    loop = torch.nn.Module()
    loop.register_buffer("b", torch.ones(2))
    loop._modules["again"] = loop  # a module that contains itself: state_dict() would never end
    path = save(loop, tmp_path / "loop.pkl", "pickle")
    with open_lazy(path) as lazy, pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: module again"):
        flatten_module(lazy.obj, source=str(path))

    odd = torch.nn.Module()
    odd.register_buffer("b", torch.ones(2))
    odd.register_buffer("c", torch.ones(1))
    odd._non_persistent_buffers_set = [["unhashable"], "c"]  # type: ignore[assignment]
    with open_lazy(save(odd, tmp_path / "odd.pkl", "pickle")) as lazy:
        assert list(flatten_module(lazy.obj) or {}) == ["b"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mutated_files_raise_only_checkpoint_error(tmp_path: Path, layout: str) -> None:
    """Random byte edits of a valid file: it loads (possibly with other values) or fails with one clear
    CheckpointError line, on open or when read; never another exception."""
    original = save(varied_state(), tmp_path / "ok.pt", layout).read_bytes()
    rng = random.Random(layout)
    path = tmp_path / "mutated.pt"
    for _ in range(60):
        data = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            if rng.random() < 0.7:
                data[at] = rng.randrange(256)
            else:
                del data[at : at + rng.randint(1, 16)]
        path.write_bytes(bytes(data))
        try:
            with open_lazy(path) as lazy:
                for value in (lazy.obj.values() if isinstance(lazy.obj, dict) else []):
                    if isinstance(value, LazyTensor):
                        value.materialize()
        except CheckpointError as err:
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err)


class TaggedTensor(torch.Tensor):
    """A tensor subclass: pickles through _rebuild_from_type_v2."""


@pytest.mark.parametrize("layout", LAYOUTS)
def test_newer_dtypes_conj_bits_and_subclasses(tmp_path: Path, layout: str) -> None:
    parameter = torch.nn.Parameter(torch.randn(3))
    parameter.note = "has Python state"  # -> _rebuild_parameter_with_state
    state = {
        "uint16": torch.arange(5).to(torch.uint16),  # -> _rebuild_tensor_v3 with an UntypedStorage
        "uint32": torch.arange(5).to(torch.uint32),
        "float8": torch.randn(4).to(torch.float8_e4m3fn),
        "complex": torch.randn(3, dtype=torch.complex64),
        "conj_bit": torch.randn(3, dtype=torch.complex64).conj(),  # saved with metadata {"conj": True}
        "parameter": parameter,
        "subclass": torch.randn(4).as_subclass(TaggedTensor),
    }
    with open_lazy(save(state, tmp_path / "new.pt", layout)) as lazy:
        for key, tensor in state.items():
            expected = torch.Tensor.as_subclass(tensor.detach().resolve_conj(), torch.Tensor)
            got = lazy.obj[key].materialize()
            assert got.dtype == expected.dtype and got.shape == expected.shape, key
            assert got.view(torch.uint8).equal(expected.view(torch.uint8)), key  # bitwise, any dtype
