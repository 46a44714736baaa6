"""A corpus of bad inputs, each built by the tests themselves, with its exact expectation.

Every case is a function that writes its files into a fresh folder and returns an ``Expect``: the CLI
arguments to run, and the pieces of text the ONE error line must contain (the file at fault, the key or the
option). The runner in ``test_corpus.py`` checks the rest for every case alike: exit code 2, one line on
stderr, no traceback, no new file (no output, no temporary file), every input byte-identical, no canary.

Hostile pickles write a canary file when (and only when) their payload runs; its absence proves nothing ran.
The seeds for the fuzz targets (``valid_seeds``) live here too, so corpus and fuzzer grow together.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CANARY = "CANARY"  # the file a hostile payload would create, in the case's folder


@dataclass
class Expect:
    """What a case runs and what its one error line must say."""

    argv: list[str]
    needles: tuple[str, ...]
    #: a case that also runs code in the payload must leave this file absent
    canary: Path | None = None
    #: the case depends on a component not landed yet (reason); the runner marks it xfail(strict)
    pending: str | None = None
    #: text the error line must NOT contain (bytes of a foreign file, read as a number or as text)
    absent: tuple[str, ...] = ()


@dataclass
class Workspace:
    """A case's folder, with helpers to write good and bad files into it."""

    root: Path
    made: list[Path] = field(default_factory=list)

    @property
    def canary(self) -> Path:
        return self.root / CANARY

    @property
    def out(self) -> str:
        return str(self.root / "soup.safetensors")

    def good(self, name: str = "good.safetensors", seed: int = 0, state: dict | None = None) -> Path:
        from safetensors.torch import save_file

        path = self.root / name
        tensors = state if state is not None else small_state(seed)
        if path.suffix == ".safetensors":
            save_file(tensors, str(path))
        else:
            torch.save(tensors, path)
        return path

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def pickle(self, name: str, obj: Any, layout: str = "pickle") -> Path:
        path = self.root / name
        if layout == "pickle":
            path.write_bytes(pickle.dumps(obj, protocol=2))
        elif layout == "zip":
            torch.save(obj, path)
        elif layout == "legacy":
            torch.save(obj, path, _use_new_zipfile_serialization=False)
        else:
            raise ValueError(layout)
        return path


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny model-shaped state dict with a float, a half and an integer tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=g),
        "layer.bias": torch.randn(4, generator=g),
        "norm.weight": torch.randn(3, generator=g).half(),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


# ------------------------------------------------------------------------------------------ raw file makers


def safetensors_bytes(header: Any, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    """A safetensors file with the given header (a JSON-able object, or raw bytes) and data section."""
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def valid_safetensors() -> bytes:
    """A real safetensors file (written by the safetensors library) of ``small_state()``."""
    from safetensors.torch import save

    return save(small_state(), metadata={"note": "seed"})


def torch_zip_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def torch_legacy_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def without_zip_record(data: bytes, suffix: str) -> bytes:
    """The torch zip ``data`` re-written without the record whose name ends with ``suffix``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if not info.filename.endswith(suffix):
                target.writestr(info, source.read(info))
    return out.getvalue()


def random_bytes(seed: int, n: int = 4096, prefix: bytes = b"") -> bytes:
    rng = random.Random(seed)
    return prefix + bytes(rng.getrandbits(8) for _ in range(n - len(prefix)))


# ------------------------------------------------------------------------------------------ hostile payloads


class Call:
    """Pickles as ``fn(*args)``: what a malicious checkpoint does through ``__reduce__``."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def touch_code(canary: Path) -> str:
    """Python source that creates the canary."""
    return f"open({str(canary)!r}, 'w').close()"


def hostile_objects(canary: Path) -> dict[str, Any]:
    """name -> an object whose unpickling would create ``canary`` (and the qualname soupkit names)."""
    import builtins
    import runpy

    script = canary.with_name("payload.py")
    return {
        "os.system": Call(os.system, f"touch {canary}"),
        "eval": Call(builtins.eval, touch_code(canary)),
        "exec": Call(builtins.exec, touch_code(canary)),
        "subprocess.Popen": Call(subprocess.Popen, ["touch", str(canary)]),
        "runpy.run_path": Call(runpy.run_path, str(script)),
        "torch.load": Call(torch.load, str(canary.with_name("inner.pt"))),
    }


def handwritten_hostile(canary: Path) -> dict[str, bytes]:
    """Pickles written opcode by opcode: tricks a ``__reduce__`` in Python would not produce."""
    code = touch_code(canary).encode()
    return {
        # getattr(builtins, "eval")(code): the classic way around a name blocklist
        "getattr(builtins, 'eval')": (
            b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__builtins__\nX\x04\x00\x00\x00eval\x86R"
            + b"X" + struct.pack("<I", len(code)) + code + b"\x85R."
        ),
        # protocol 4 STACK_GLOBAL of posix.system
        "STACK_GLOBAL posix.system": (
            b"\x80\x04\x8c\x05posix\x8c\x06system\x93"
            + b"\x8c" + bytes([len(f"touch {canary}")]) + f"touch {canary}".encode() + b"\x85R."
        ),
        # INST opcode: instantiate 'class' os.system with an argument (calls it)
        "INST posix.system": b"(S'touch " + str(canary).encode() + b"'\niposix\nsystem\n.",
        # OBJ opcode
        "OBJ builtins.exec": b"(cbuiltins\nexec\nX" + struct.pack("<I", len(code)) + code + b"o.",
        # a state dict {"w": <tensor-like>, "x": __import__("os").system(...)} via builtins.__import__
        "__import__": (
            b"\x80\x02}X\x01\x00\x00\x00xcbuiltins\ngetattr\ncbuiltins\n__import__\nX\x02\x00\x00\x00os\x85R"
            b"X\x06\x00\x00\x00system\x86R" + b"X" + struct.pack("<I", len(f"touch {canary}"))
            + f"touch {canary}".encode() + b"\x85Rs."
        ),
        # copyreg._reconstructor around os.system: must not construct through the real callable
        "copyreg._reconstructor": (
            b"\x80\x02ccopyreg\n_reconstructor\ncposix\nsystem\ncbuiltins\nobject\nN\x87R)R."
        ),
    }


# ------------------------------------------------------------------------------------------ the corpus

CASES: dict[str, Callable[[Workspace], Expect]] = {}


def case(name: str) -> Callable[[Callable[[Workspace], Expect]], Callable[[Workspace], Expect]]:
    def register(fn: Callable[[Workspace], Expect]) -> Callable[[Workspace], Expect]:
        if name in CASES:
            raise ValueError(f"duplicate corpus case {name!r}")
        CASES[name] = fn
        return fn

    return register


def merge_with(w: Workspace, bad: Path, *needles: str, pending: str | None = None) -> Expect:
    """``soupkit merge GOOD BAD -o OUT``: the error must name ``bad``."""
    return Expect(["merge", str(w.good()), str(bad), "-o", w.out], (str(bad), *needles), w.canary, pending)


# --- unreadable files --------------------------------------------------------------------------------------------

for _ext in (".safetensors", ".pt"):
    def _empty(w: Workspace, ext: str = _ext) -> Expect:
        return merge_with(w, w.write(f"empty{ext}", b""), "file is empty")

    case(f"empty{_ext}")(_empty)

for _index, _ext in enumerate((".safetensors", ".pt", ".pth", ".bin", ".ckpt")):
    def _random(w: Workspace, ext: str = _ext, seed: int = _index) -> Expect:
        return merge_with(w, w.write(f"noise{ext}", random_bytes(seed, prefix=b"\x13\x37")))

    case(f"random bytes{_ext}")(_random)


@case("random bytes posing as a zip (.pt)")
def _fake_zip(w: Workspace) -> Expect:
    return merge_with(w, w.write("fake_zip.pt", random_bytes(10, prefix=b"PK\x03\x04")), "torch checkpoint")


@case("random bytes posing as a pickle (.bin)")
def _fake_pickle(w: Workspace) -> Expect:
    return merge_with(w, w.write("fake_pickle.bin", random_bytes(11, prefix=b"\x80\x02")), "torch checkpoint")


@case("nonexistent input")
def _missing(w: Workspace) -> Expect:
    return merge_with(w, w.root / "nowhere.safetensors", "no such file")


@case("folder with no checkpoint")
def _empty_folder(w: Workspace) -> Expect:
    folder = w.root / "empty_run"
    folder.mkdir()
    (folder / "notes.txt").write_text("nothing here")
    return merge_with(w, folder, "does not hold exactly one checkpoint")


# --- safetensors that lie ---------------------------------------------------------------------------------------


@case("safetensors header cut")
def _header_cut(w: Workspace) -> Expect:
    data = valid_safetensors()
    return merge_with(w, w.write("cut_header.safetensors", data[:40]), "truncated header")


@case("safetensors data cut")
def _data_cut(w: Workspace) -> Expect:
    data = valid_safetensors()
    return merge_with(w, w.write("cut_data.safetensors", data[:-10]), "file is truncated")


@case("safetensors header length beyond 100 MB")
def _huge_header(w: Workspace) -> Expect:
    return merge_with(w, w.write("huge.safetensors", struct.pack("<Q", 1 << 62) + b'{"a":1}'), "header length")


@case("safetensors header is not JSON")
def _not_json(w: Workspace) -> Expect:
    return merge_with(w, w.write("garbled.safetensors", safetensors_bytes(None, raw_header=b'{"a": [1, 2')),
                      "not valid JSON")


@case("safetensors header is invalid UTF-8")
def _bad_utf8(w: Workspace) -> Expect:
    return merge_with(w, w.write("utf8.safetensors", safetensors_bytes(None, raw_header=b'{"\xff\xfe": 1}')),
                      "not valid JSON")


@case("safetensors header is a list")
def _non_object(w: Workspace) -> Expect:
    return merge_with(w, w.write("list.safetensors", safetensors_bytes([1, 2, 3])), "not a JSON object")


@case("safetensors header nested 100000 deep")
def _deep_header(w: Workspace) -> Expect:
    raw = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return merge_with(w, w.write("deep.safetensors", safetensors_bytes(None, raw_header=raw)), "nested too deeply")


@case("file name with a newline")
def _newline_name(w: Workspace) -> Expect:
    bad = w.write("ev\nil.safetensors", b"garbage")
    expect = merge_with(w, bad, "too short")
    expect.needles = (str(bad).replace("\n", "\\n"), "too short")  # escaped: the error stays one line
    return expect


@case("safetensors overlapping offsets")
def _overlap(w: Workspace) -> Expect:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    return merge_with(w, w.write("overlap.safetensors", safetensors_bytes(header, bytes(12))), "overlap")


@case("safetensors offsets past EOF")
def _past_eof(w: Workspace) -> Expect:
    header = {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    return merge_with(w, w.write("past_eof.safetensors", safetensors_bytes(header, bytes(16))),
                      "file is truncated", "'a'")


@case("safetensors dtype/shape byte mismatch")
def _byte_mismatch(w: Workspace) -> Expect:
    header = {"a": {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 16]}}
    return merge_with(w, w.write("mismatch.safetensors", safetensors_bytes(header, bytes(16))),
                      "'a'", "needs 32 bytes")


@case("safetensors unknown dtype")
def _unknown_dtype(w: Workspace) -> Expect:
    header = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    return merge_with(w, w.write("dtype.safetensors", safetensors_bytes(header, bytes(16))), "unknown dtype 'F128'")


@case("safetensors negative shape")
def _negative_shape(w: Workspace) -> Expect:
    header = {"a": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}
    return merge_with(w, w.write("shape.safetensors", safetensors_bytes(header, bytes(16))), "bad shape")


@case("safetensors offsets reversed")
def _reversed(w: Workspace) -> Expect:
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [8, 4]}}
    return merge_with(w, w.write("reversed.safetensors", safetensors_bytes(header, bytes(16))), "bad data_offsets")


@case("safetensors bad __metadata__")
def _bad_metadata(w: Workspace) -> Expect:
    header = {"__metadata__": {"epoch": 3}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    return merge_with(w, w.write("meta.safetensors", safetensors_bytes(header, bytes(4))), "__metadata__")


@case("safetensors tensor entry not an object")
def _entry_not_object(w: Workspace) -> Expect:
    return merge_with(w, w.write("entry.safetensors", safetensors_bytes({"a": [0, 4]}, bytes(4))),
                      "'a'", "not an object")


# --- torch files --------------------------------------------------------------------------------------------------


@case(".pt zip with a missing record")
def _missing_record(w: Workspace) -> Expect:
    data = without_zip_record(torch_zip_bytes(small_state()), "/data/0")
    return merge_with(w, w.write("missing_record.pt", data), "is missing from the zip archive")


@case(".pt zip cut in half")
def _zip_cut(w: Workspace) -> Expect:
    data = torch_zip_bytes(small_state())
    return merge_with(w, w.write("zip_cut.pt", data[: len(data) // 2]), "torch checkpoint")


@case("legacy .pt cut before its storages")
def _legacy_cut(w: Workspace) -> Expect:
    data = torch_legacy_bytes(small_state())
    return merge_with(w, w.write("legacy_cut.pt", data[:-40]), "truncated")


for _what, _obj, _needle in (("a list", [1, 2, 3], "holds a list"), ("a string", "weights", "holds a str"),
                             ("None", None, "holds None"), ("a dict without tensors", {"epoch": 3}, "no tensors")):
    def _not_state_dict(w: Workspace, obj: Any = _obj, needle: str = _needle) -> Expect:
        return merge_with(w, w.pickle("not_a_state_dict.pt", obj, "zip"), "not a state dict", needle)

    case(f"pickle holding {_what}")(_not_state_dict)


@case("stride-0 view claiming 4.4 TB in a 2 KB .pt")
def _memory_bomb(w: Workspace) -> Expect:
    # torch.save keeps the view: one stored float, shape 2**20 x 2**20 with stride (0, 0). Materialising it would
    # need 4.4 TB; a reader must refuse it as a checkpoint error (not a RuntimeError from the allocator, nor
    # an allocation that succeeds under overcommit and takes the machine's memory).
    bomb = {**small_state(1), "layer.weight": torch.zeros(1).expand(2**20, 2**20)}
    bad = w.pickle("bomb.pt", bomb, "zip")
    return Expect(["convert", str(bad), w.out], (str(bad), "layer.weight"),
                  w.canary)


@case("stride-0 view claiming 4.5 PB in a 2 KB .pt, merged")
def _memory_bomb_merged(w: Workspace) -> Expect:
    # 2**50 elements: a merge planning its chunks by the claimed size would build 2**30 steps before reading a
    # byte (hours and terabytes); the reader refuses the view when the file is opened
    bomb = {**small_state(1), "layer.weight": torch.zeros(1).expand(2**25, 2**25)}
    first, second = w.pickle("bomb1.pt", bomb, "zip"), w.pickle("bomb2.pt", bomb, "zip")
    return Expect(["merge", str(first), str(second), "-o", w.out], (str(first), "layer.weight"), w.canary)


@case("state dict with a non-string key")
def _int_key(w: Workspace) -> Expect:
    return merge_with(w, w.pickle("int_key.pt", {0: torch.ones(2), "b": torch.ones(2)}, "zip"), "not a string")


# --- hostile pickles: nothing may run -----------------------------------------------------------------------------

_HOSTILE_QUALNAMES = {"os.system": "posix.system", "eval": "builtins.eval", "exec": "builtins.exec",
                      "subprocess.Popen": "subprocess.Popen", "runpy.run_path": "runpy.run_path",
                      "torch.load": "torch.serialization.load"}  # fmt: skip
_HOSTILE_LAYOUTS = {"os.system": ("pickle", "zip", "legacy"), "eval": ("pickle",), "exec": ("zip",),
                    "subprocess.Popen": ("pickle", "zip"), "runpy.run_path": ("legacy",), "torch.load": ("zip",)}


def _prepare_payloads(w: Workspace) -> None:
    """Files the payloads would use if they ran: a script and a torch file that each create the canary."""
    (w.root / "payload.py").write_text(touch_code(w.canary) + "\n")
    (w.root / "inner.pt").write_bytes(pickle.dumps(Call(os.system, f"touch {w.canary}"), protocol=2))


for _payload, _layouts in _HOSTILE_LAYOUTS.items():
    for _layout in _layouts:
        def _hostile(w: Workspace, payload: str = _payload, layout: str = _layout) -> Expect:
            _prepare_payloads(w)
            obj = hostile_objects(w.canary)[payload]
            # nested inside a real-looking checkpoint, beside real tensors
            wrapped = {"epoch": 3, "state_dict": {**small_state(), "extra": [{"hook": obj}]}}
            bad = w.pickle(f"evil_{layout}.pt", wrapped, layout)
            qualname = _HOSTILE_QUALNAMES[payload]
            if os.name != "posix":
                qualname = qualname.replace("posix", "nt")
            return merge_with(w, bad, f"refusing to load: the pickle calls {qualname}")

        case(f"hostile {_payload} ({_layout})")(_hostile)

for _trick in ("getattr(builtins, 'eval')", "STACK_GLOBAL posix.system", "INST posix.system", "OBJ builtins.exec",
               "__import__", "copyreg._reconstructor"):
    def _handwritten(w: Workspace, trick: str = _trick) -> Expect:
        bad = w.write("trick.pkl", handwritten_hostile(w.canary)[trick])
        return merge_with(w, bad)

    case(f"hostile handwritten {_trick}")(_handwritten)


@case("hostile pickle as the --base of task_arithmetic")
def _hostile_base(w: Workspace) -> Expect:
    bad = w.pickle("evil_base.pt", {**small_state(), "x": Call(os.system, f"touch {w.canary}")}, "zip")
    return Expect(["merge", str(w.good("a.safetensors", 1)), str(w.good("b.safetensors", 2)), "--method",
                   "task_arithmetic", "--base", str(bad), "-o", w.out], (str(bad), "refusing to load"), w.canary)


@case("hostile pickle to inspect")
def _hostile_inspect(w: Workspace) -> Expect:
    bad = w.pickle("evil.ckpt", {"state_dict": {**small_state(), "x": Call(os.system, f"touch {w.canary}")}}, "zip")
    return Expect(["inspect", str(bad)], (str(bad), "refusing to load"), w.canary)


@case("hostile pickle to convert")
def _hostile_convert(w: Workspace) -> Expect:
    bad = w.pickle("evil.pth", {"model": Call(os.system, f"touch {w.canary}")}, "legacy")
    return Expect(["convert", str(bad), w.out], (str(bad), "refusing to load"), w.canary)


# --- inputs that do not fit together ------------------------------------------------------------------------------


@case("key mismatch")
def _keys(w: Workspace) -> Expect:
    state = small_state(1)
    state["layer.weigth"] = state.pop("layer.weight")
    bad = w.good("renamed.safetensors", state=state)
    # the message names the input that lacks a key and the key (here: the good file lacks 'layer.weigth')
    return Expect(["merge", str(w.good()), str(bad), "-o", w.out], (str(w.root / "good.safetensors"),
                  "lacks 1 key(s)", "'layer.weigth'"), w.canary)


@case("shape mismatch")
def _shapes(w: Workspace) -> Expect:
    state = small_state(1)
    state["layer.weight"] = torch.randn(3, 4)
    bad = w.good("transposed.safetensors", state=state)
    return merge_with(w, bad, "shape mismatch at 'layer.weight'")


@case("float vs int mismatch")
def _float_int(w: Workspace) -> Expect:
    state = small_state(1)
    state["layer.bias"] = torch.arange(4, dtype=torch.int32)
    bad = w.good("int_bias.safetensors", state=state)
    return merge_with(w, bad, "dtype mismatch at 'layer.bias'")


for _name, _value in (("NaN", float("nan")), ("Inf", float("inf")), ("-Inf", float("-inf"))):
    def _nonfinite(w: Workspace, value: float = _value, name: str = _name) -> Expect:
        state = small_state(1)
        state["layer.weight"][1, 2] = value
        bad = w.good(f"{name.lower()}.safetensors", state=state)
        return merge_with(w, bad, "'layer.weight'", "NaN or Inf", "--allow-nonfinite")

    case(f"{_name} in an input")(_nonfinite)


@case("NaN in an fp16 tensor of a .pt input")
def _nan_half(w: Workspace) -> Expect:
    state = small_state(1)
    state["norm.weight"][0] = float("nan")
    return merge_with(w, w.pickle("nan_half.pt", state, "zip"), "'norm.weight'", "NaN or Inf")


# --- bad option values and method misuse -------------------------------------------------------------------------


def _two(w: Workspace) -> list[str]:
    return [str(w.good("a.safetensors", 1)), str(w.good("b.safetensors", 2))]


def options_case(name: str, extra: list[str], *needles: str, inputs: int = 2) -> None:
    def build(w: Workspace) -> Expect:
        paths = [*_two(w), str(w.good("c.safetensors", 3))][:inputs]
        args = [str(w.good("base.safetensors", 4)) if a == "BASE" else a for a in extra]
        return Expect(["merge", *paths, *args, "-o", w.out], tuple(needles), w.canary)

    case(name)(build)


options_case("single input to slerp", ["--method", "slerp", "--t", "0.5"], "'slerp'", "exactly 2", inputs=1)
options_case("three inputs to slerp", ["--method", "slerp", "--t", "0.5"], "'slerp'", "exactly 2", inputs=3)
options_case("unknown method", ["--method", "unifrom"], "'unifrom'", "Did you mean 'uniform'", "Available")
options_case("--weights not numbers", ["--weights", "a,b"], "--weights[0]", "got a")
options_case("--weights wrong count", ["--weights", "0.2,0.3,0.5"], "weights", "3")
options_case("--dtype fp8", ["--dtype", "fp8"], "--dtype", "'fp8'", "fp32, fp16, bf16 or fp64")
options_case("--shard-size banana", ["--shard-size", "banana"], "--shard-size", "'banana'")
options_case("--shard-size zero", ["--shard-size", "0"], "--shard-size", "positive")
options_case("--density out of range", ["--method", "ties", "--density", "1.5", "--base", "BASE"], "density")
options_case("--device nonsense", ["--device", "tpu9"], "--device", "'tpu9'")
options_case("--include matching nothing", ["--include", "decoder.*"], "'decoder.*'", "matches no tensor")
options_case("unknown option", ["--wieghts", "1,2"], "--wieghts")
options_case("--alpha not a number", ["--method", "wise", "--alpha", "half"], "--alpha")
options_case("base given to uniform", ["--base", "BASE"], "does not use a base model")
options_case("task_arithmetic without base", ["--method", "task_arithmetic"], "needs a base model")


@case("duplicate input paths")
def _duplicate(w: Workspace) -> Expect:
    a = w.good("a.safetensors", 1)
    return Expect(["merge", str(a), str(w.good("b.safetensors", 2)), str(a), "-o", w.out],
                  (str(a), "given twice", "--weights"), w.canary)


@case("duplicate input through another spelling")
def _duplicate_spelling(w: Workspace) -> Expect:
    a = w.good("a.safetensors", 1)
    other = w.root / "." / ".." / w.root.name / "a.safetensors"
    return Expect(["merge", str(a), str(other), "-o", w.out], ("given twice",), w.canary)


@case("single input to wise")
def _wise_one(w: Workspace) -> Expect:
    a = w.good("a.safetensors", 1)
    return Expect(["wise", str(a), "-o", w.out], ("Missing argument", "'FINETUNED'"), w.canary)


# --- outputs that would lose data ----------------------------------------------------------------------------------


@case("output equal to an input")
def _output_is_input(w: Workspace) -> Expect:
    a, b = _two(w)
    return Expect(["merge", a, b, "-o", b, "--force"], (b, "would overwrite the input"), w.canary)


@case("output is a hard link to an input")
def _output_hardlink(w: Workspace) -> Expect:
    a, b = _two(w)
    link = w.root / "link.safetensors"
    os.link(b, link)
    return Expect(["merge", a, b, "-o", str(link), "--force"], (str(link), "would overwrite the input"), w.canary)


@case("output is a symlink to an input")
def _output_symlink(w: Workspace) -> Expect:
    a, b = _two(w)
    link = w.root / "alias.safetensors"
    link.symlink_to(b)
    return Expect(["merge", a, b, "-o", str(link), "--force"], (str(link), "would overwrite the input"), w.canary)


@case("output equal to a shard of a sharded input")
def _output_is_shard(w: Workspace) -> Expect:
    from soupkit.io import save_checkpoint

    folder = w.root / "sharded"
    index = save_checkpoint(small_state(3), folder / "model.safetensors", shard_size=40)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    return Expect(["merge", str(w.good("a.safetensors", 1)), str(index), "-o", str(shard), "--force"],
                  (str(shard), "would overwrite the input"), w.canary)


@case("sharded output whose shard name is an input")
def _shard_is_input(w: Workspace) -> Expect:
    # soup.safetensors with --shard-size 40B writes soup-0000{1,2,3}-of-00003.safetensors: never over an input
    victim = w.good("soup-00001-of-00003.safetensors", 1)
    return Expect(["merge", str(victim), str(w.good("b.safetensors", 2)), "-o", w.out, "--shard-size", "40B",
                   "--force"], (str(victim), "would overwrite the input"), w.canary)


@case("sharded output whose index is the input")
def _index_is_input(w: Workspace) -> Expect:
    from soupkit.io import save_checkpoint

    index = save_checkpoint(small_state(1), w.root / "soup.safetensors", shard_size=40)
    return Expect(["convert", str(index), w.out, "--shard-size", "40B", "--force"],
                  ("would overwrite the input",), w.canary)


@case("sharded output over existing shards without --force")
def _shards_exist(w: Workspace) -> Expect:
    existing = w.write("soup-00002-of-00003.safetensors", b"an earlier run's shard")
    return Expect(["merge", *_two(w), "-o", w.out, "--shard-size", "40B"], (str(existing), "--force"), w.canary)


@case("output exists without --force")
def _exists(w: Workspace) -> Expect:
    a, b = _two(w)
    existing = w.write("soup.safetensors", b"precious")
    return Expect(["merge", a, b, "-o", str(existing)], (str(existing), "--force"), w.canary)


@case("output path is a directory")
def _output_dir(w: Workspace) -> Expect:
    a, b = _two(w)
    target = w.root / "out.safetensors"
    target.mkdir()
    return Expect(["merge", a, b, "-o", str(target)], (str(target), "is a directory"), w.canary)


@case("output without a checkpoint suffix")
def _output_suffix(w: Workspace) -> Expect:
    a, b = _two(w)
    return Expect(["merge", a, b, "-o", str(w.root / "soup.txt")], ("soup.txt", ".safetensors"), w.canary)


@case("output under a regular file")
def _output_under_file(w: Workspace) -> Expect:
    a, b = _two(w)
    blocker = w.write("blocker", b"not a folder")
    return Expect(["merge", a, b, "-o", str(blocker / "soup.safetensors")], ("blocker", "not a directory"),
                  w.canary)


@case("output in a directory that refuses new files (/proc)")
def _output_proc(w: Workspace) -> Expect:
    a, b = _two(w)
    return Expect(["merge", a, b, "-o", "/proc/soup.safetensors"], ("/proc/soup.safetensors",), w.canary)


# --- sharded indexes -----------------------------------------------------------------------------------------------


def _sharded(w: Workspace) -> tuple[Path, dict]:
    from soupkit.io import save_checkpoint

    index = save_checkpoint(small_state(1), w.root / "sharded" / "model.safetensors", shard_size=40)
    return index, json.loads(index.read_text())


@case("index pointing at a missing shard")
def _missing_shard(w: Workspace) -> Expect:
    index, content = _sharded(w)
    victim = sorted(set(content["weight_map"].values()))[-1]
    (index.parent / victim).unlink()
    return merge_with(w, index, f"shard {victim!r} listed in the index does not exist")


for _escape in ("../x.safetensors", "/etc/passwd", "sub/../../good.safetensors"):
    def _escaping(w: Workspace, escape: str = _escape) -> Expect:
        index, content = _sharded(w)
        first = next(iter(content["weight_map"]))
        content["weight_map"][first] = escape
        w.good("x.safetensors")
        index.write_text(json.dumps(content))
        return merge_with(w, index, f"shard {escape!r} points outside the checkpoint folder")

    case(f"index shard path escapes the folder ({_escape})")(_escaping)


@case("index JSON nested 100000 deep")
def _index_deep(w: Workspace) -> Expect:
    index, _ = _sharded(w)
    index.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return merge_with(w, index, "not valid JSON")


@case("index that is not JSON")
def _index_garbage(w: Workspace) -> Expect:
    index, _ = _sharded(w)
    index.write_text('{"weight_map": ')
    return merge_with(w, index, "not valid JSON")


@case("index without weight_map")
def _index_no_map(w: Workspace) -> Expect:
    index, _ = _sharded(w)
    index.write_text(json.dumps({"metadata": {}, "weights": {}}))
    return merge_with(w, index, "weight_map")


@case("index naming a tensor its shard lacks")
def _index_lies(w: Workspace) -> Expect:
    index, content = _sharded(w)
    content["weight_map"]["ghost.weight"] = next(iter(content["weight_map"].values()))
    index.write_text(json.dumps(content))
    return merge_with(w, index, "'ghost.weight'")


# --- configs and recipes -------------------------------------------------------------------------------------------

@case("malformed merge config YAML")
def _config_yaml(w: Workspace) -> Expect:
    config = w.root / "merge.yaml"
    config.write_text("method: linear\nmodels:\n  - path: a.safetensors\n   weight: [1, 2\n")
    return Expect(["merge", "--config", str(config), "-o", w.out], (str(config), "not valid YAML"), w.canary)


@case("merge config naming a missing model")
def _config_missing(w: Workspace) -> Expect:
    config = w.root / "merge.yaml"
    w.good("a.safetensors")
    config.write_text("method: uniform\nmodels:\n  - path: a.safetensors\n  - path: gone.safetensors\n")
    return Expect(["merge", "--config", str(config), "-o", w.out], (str(config), "gone.safetensors"), w.canary)


@case("merge config YAML nested 5000 deep")
def _config_deep(w: Workspace) -> Expect:
    config = w.root / "merge.yaml"
    config.write_text("method: " + "[" * 5000 + "]" * 5000 + "\n")
    return Expect(["merge", "--config", str(config), "-o", w.out], (str(config),), w.canary)


@case("merge config with an unknown field")
def _config_field(w: Workspace) -> Expect:
    config = w.root / "merge.yaml"
    w.good("a.safetensors", 1)
    w.good("b.safetensors", 2)
    config.write_text("method: uniform\nmodles:\n  - path: a.safetensors\n  - path: b.safetensors\n")
    return Expect(["merge", "--config", str(config), "-o", w.out], (str(config), "modles"), w.canary)


MALFORMED_RECIPE = "model: {kind: python\ndata: [\n"
MISSING_DATA_RECIPE = ("model: {kind: python, factory: soupkit.demo_train:digits_cnn, num_classes: 10}\n"
                       "data:\n  heldout: {kind: imagefolder, path: no_such_data}\n")


def digits_models(w: Workspace) -> list[str]:
    """Two checkpoints of the model the recipes name (so the recipe's data is what fails)."""
    from soupkit.demo_train import digits_cnn

    state = {k: v.contiguous() for k, v in digits_cnn(num_classes=10).state_dict().items()}
    return [str(w.good("a.safetensors", state=state)),
            str(w.good("b.safetensors", state={k: v + 1 if v.is_floating_point() else v for k, v in state.items()}))]


@case("malformed eval recipe YAML (greedy soup)")
def _recipe_yaml_greedy(w: Workspace) -> Expect:
    recipe = w.root / "recipe.yaml"
    recipe.write_text(MALFORMED_RECIPE)
    return Expect(["merge", *_two(w), "--method", "greedy", "--eval", str(recipe), "-o", w.out],
                  (str(recipe), "not valid YAML", "line 2"), w.canary)


@case("eval recipe naming missing data (greedy soup)")
def _recipe_missing_greedy(w: Workspace) -> Expect:
    recipe = w.root / "recipe.yaml"
    recipe.write_text(MISSING_DATA_RECIPE)
    return Expect(["merge", *digits_models(w), "--method", "greedy", "--eval", str(recipe), "-o", w.out],
                  (str(recipe), "data.heldout.path", "no_such_data"), w.canary)


@case("eval recipe YAML nested 5000 deep (greedy soup)")
def _recipe_deep(w: Workspace) -> Expect:
    recipe = w.root / "recipe.yaml"
    recipe.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    return Expect(["merge", *_two(w), "--method", "greedy", "--eval", str(recipe), "-o", w.out], (str(recipe),),
                  w.canary)


@case("malformed eval recipe YAML (soupkit eval)")
def _recipe_yaml(w: Workspace) -> Expect:
    recipe = w.root / "recipe.yaml"
    recipe.write_text(MALFORMED_RECIPE)
    return Expect(["eval", str(w.good()), "--eval", str(recipe)], (str(recipe), "not valid YAML"), w.canary)


@case("eval recipe naming missing data (soupkit eval)")
def _recipe_missing(w: Workspace) -> Expect:
    recipe = w.root / "recipe.yaml"
    recipe.write_text(MISSING_DATA_RECIPE)
    return Expect(["eval", digits_models(w)[0], "--eval", str(recipe)], (str(recipe), "data.heldout.path",
                  "no_such_data"), w.canary)


# ------------------------------------------------------------------------------------------ fuzz seeds


def valid_seeds() -> dict[str, tuple[str, bytes]]:
    """name -> (file suffix, bytes) of valid checkpoints in every layout soupkit reads: the fuzzers mutate
    these. Small, so a mutation hits structure (headers, offsets, opcodes) rather than tensor data."""
    state = small_state()
    nested = {"epoch": 1, "state_dict": state, "meta": {"lr": 0.1, "names": ["a", "b"]}}
    return {
        "safetensors": (".safetensors", valid_safetensors()),
        "zip": (".pt", torch_zip_bytes(nested)),
        "legacy": (".pt", torch_legacy_bytes(state)),
        "pickle": (".pkl", pickle.dumps(nested, protocol=2)),
        "pickle4": (".pkl", pickle.dumps(state, protocol=4)),
    }


# round three (issues 22 and 26): Hugging Face folders, small files and output folders; registers into CASES
import tests.hostile.corpus_folders  # noqa: E402, F401

# round two (issue 13): bombs, escapes, odd files and names, alias bombs; bad mergekit configs (issue 21: numbers
# finite and in range, layer ranges, unsupported fields); issues 22/26's data, text recipe and tokenizer-file
# cases; LoRA adapters (issues 22, 26). Each registers into CASES
from tests.hostile import corpus_adapters, corpus_bombs, corpus_data, corpus_mergekit  # noqa: E402, F401
