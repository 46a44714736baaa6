"""Round two of the bad-input corpus (issue 13): resource bombs, escapes from a checkpoint folder, odd files and
names, alias bombs and options that ask for unbounded work. Registered into ``corpus.CASES`` (imported at the
end of ``corpus.py``), so ``test_corpus.py`` gives every case the same treatment: exit 2, one line naming the
culprit, no traceback, no output or temporary file, inputs unchanged. ``BOMBS`` lists the cases whose peak
memory ``test_bomb_memory.py`` also bounds in a subprocess.

Each class is covered beyond the example the issue gave: every zip compression a ``.pt`` may use, every record a
reader decompresses, every layout a tensor flag can come from, every field of a safetensors header entry, every
place a file is opened by name (inputs, shards, indexes, configs, recipes, bases).
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from tests.hostile.corpus import (
    Expect,
    Workspace,
    _sharded,
    _two,
    merge_with,
    safetensors_bytes,
    small_state,
    torch_zip_bytes,
)
from tests.hostile.corpus import case as register

#: cases that are resource bombs: their peak memory is bounded in a subprocess by test_bomb_memory.py
BOMBS: list[str] = []
#: every case this module adds
ROUND2: list[str] = []


def case(name: str) -> Callable[[Callable[[Workspace], Expect]], Callable[[Workspace], Expect]]:
    ROUND2.append(name)
    return register(name)


def bomb(name: str) -> Callable[[Callable[[Workspace], Expect]], Callable[[Workspace], Expect]]:
    BOMBS.append(name)
    return case(name)


# ------------------------------------------------------------------------------------------ zip surgery


def rezip(data: bytes, compress: dict[str, int] | None = None, replace: dict[str, bytes] | None = None) -> bytes:
    """A torch zip rewritten: records whose name ends with a key of ``replace`` get new bytes, records whose
    name ends with a key of ``compress`` are stored with that compression (zipfile.ZIP_*)."""
    compress, replace = compress or {}, replace or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            body = source.read(info)
            method = zipfile.ZIP_STORED
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    body = new
            for suffix, kind in compress.items():
                if info.filename.endswith(suffix):
                    method = kind
            target.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), body, compress_type=method)
    return out.getvalue()


def record(data: bytes, suffix: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith(suffix)))


def claim_size(data: bytes, suffix: str, size: int) -> bytes:
    """Patch the zip's central directory so the record ending with ``suffix`` claims ``size`` bytes inflated."""
    buffer = bytearray(data)
    at = 0
    while (at := buffer.find(b"PK\x01\x02", at)) >= 0:
        name_len = struct.unpack("<H", buffer[at + 28 : at + 30])[0]
        if bytes(buffer[at + 46 : at + 46 + name_len]).decode().endswith(suffix):
            buffer[at + 24 : at + 28] = struct.pack("<I", size)
            return bytes(buffer)
        at += 4
    raise AssertionError(f"no record {suffix}")


PADDING = bytes(8 << 20)  # 8 MiB of zeros after a pickle's STOP: compresses to ~50 bytes with bzip2


for _kind, _method in (("bzip2", zipfile.ZIP_BZIP2), ("lzma", zipfile.ZIP_LZMA)):
    def _pickle_bomb(w: Workspace, method: int = _method) -> Expect:
        data = torch_zip_bytes(small_state())
        data = rezip(data, compress={"data.pkl": method}, replace={"data.pkl": record(data, "data.pkl") + PADDING})
        return merge_with(w, w.write("pkl_bomb.pt", data), "decompression bomb", "data.pkl")

    def _tensor_bomb(w: Workspace, method: int = _method) -> Expect:
        data = rezip(torch_zip_bytes({"big": torch.zeros(2 << 20)}), compress={"data/0": method})
        return Expect(["convert", str(w.write("tensor_bomb.pt", data)), w.out], ("tensor_bomb.pt",
                      "decompression bomb", "data/0"), w.canary)

    def _byteorder_bomb(w: Workspace, method: int = _method) -> Expect:
        data = torch_zip_bytes(small_state())
        data = rezip(data, compress={"byteorder": method}, replace={"byteorder": b"little" + PADDING})
        return merge_with(w, w.write("byteorder_bomb.pt", data), "decompression bomb", "byteorder")

    bomb(f".pt data.pkl {_kind} bomb (8 MiB from a few bytes)")(_pickle_bomb)
    bomb(f"tensor record {_kind} bomb in a .pt")(_tensor_bomb)
    bomb(f".pt byteorder record {_kind} bomb")(_byteorder_bomb)


@bomb(".pt data.pkl deflated, claiming 2 GiB")
def _claims_2gib(w: Workspace) -> Expect:
    data = rezip(torch_zip_bytes(small_state()), compress={"data.pkl": zipfile.ZIP_DEFLATED})
    return merge_with(w, w.write("claims.pt", claim_size(data, "data.pkl", 2**31)), "decompression bomb")


@bomb(".pt tensor record deflated, claiming 4 GiB - 1")
def _record_claims(w: Workspace) -> Expect:
    data = rezip(torch_zip_bytes({"w": torch.ones(4)}), compress={"data/0": zipfile.ZIP_DEFLATED})
    return merge_with(w, w.write("claims.pt", claim_size(data, "data/0", 2**32 - 1)), "decompression bomb")


def neg_view(dtype: torch.dtype) -> torch.Tensor:
    """A tensor with the 'neg' bit set, of a dtype torch cannot negate: torch.save writes it, torch.load fails."""
    return torch._neg_view(torch.zeros(2, dtype=dtype))


for _layout, _dtype in (("zip", torch.bool), ("legacy", torch.bool), ("zip", torch.uint16),
                        ("zip", torch.float8_e4m3fn), ("pickle", torch.uint32)):
    def _neg_flag(w: Workspace, layout: str = _layout, dtype: torch.dtype = _dtype) -> Expect:
        bad = w.pickle(f"neg_{layout}.pt", {**small_state(), "mask": neg_view(dtype)}, layout)
        return merge_with(w, bad, f"a {str(dtype)[6:]} tensor carries the 'neg' flag")

    case(f".pt ({_layout}) {str(_dtype)[6:]} tensor with the neg flag")(_neg_flag)


# --- complex tensors: every reader refuses them (averaging would drop the imaginary part) -------------------------

def _complex_state() -> dict[str, torch.Tensor]:
    return {**small_state(), "layer.weight": torch.randn(4, 3, dtype=torch.complex64)}


for _layout in ("zip", "legacy", "pickle"):
    def _complex_pt(w: Workspace, layout: str = _layout) -> Expect:
        return merge_with(w, w.pickle(f"complex_{layout}.pt", _complex_state(), layout), "'layer.weight'",
                          "complex")

    case(f".pt ({_layout}) with a complex tensor")(_complex_pt)


@case(".pt with a conjugated complex128 tensor")
def _complex_conj(w: Workspace) -> Expect:
    state = {**small_state(), "layer.weight": torch.randn(4, 3, dtype=torch.complex128).conj()}
    return merge_with(w, w.pickle("conj.pt", state, "zip"), "'layer.weight'", "complex128")


@case("safetensors with a complex64 tensor")
def _complex_st(w: Workspace) -> Expect:
    return merge_with(w, w.good("complex.safetensors", state=_complex_state()), "'layer.weight'", "complex")


@case("safetensors with a complex tensor to inspect")
def _complex_inspect(w: Workspace) -> Expect:
    bad = w.good("complex.safetensors", state=_complex_state())
    return Expect(["inspect", str(bad)], (str(bad), "complex"), w.canary)


# --- safetensors header fields ------------------------------------------------------------------------------------

_ENTRIES = {
    "shape [0, 2**63]": ({"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}, "bad shape"),
    "shape [0, 2**62, 4]": ({"dtype": "F32", "shape": [0, 2**62, 4], "data_offsets": [0, 0]}, "impossibly large"),
    "shape [2**62, 4] overflows int64": ({"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]},
                                         "impossibly large"),
    "shape [2**31] * 4 overflows int64": ({"dtype": "U8", "shape": [2**31] * 4, "data_offsets": [0, 0]},
                                          "impossibly large"),
    "shape [true, 3]": ({"dtype": "F32", "shape": [True, 3], "data_offsets": [0, 12]}, "bad shape [true, 3]"),
    "shape [1.0]": ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "bad shape"),
    "shape [\"2\"]": ({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}, "bad shape"),
    "shape null": ({"dtype": "F32", "shape": None, "data_offsets": [0, 4]}, "bad shape"),
    "shape {}": ({"dtype": "F32", "shape": {}, "data_offsets": [0, 4]}, "bad shape"),
    "data_offsets [false, 4]": ({"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}, "bad data_offsets"),
    "data_offsets [0, 2**64]": ({"dtype": "F32", "shape": [1], "data_offsets": [0, 2**64]}, "bad data_offsets"),
    "data_offsets [0.0, 4.0]": ({"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}, "bad data_offsets"),
    "data_offsets of three": ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}, "bad data_offsets"),
    "dtype 16 (a number)": ({"dtype": 16, "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
    "dtype [\"F32\"] (a list)": ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
}
for _what, (_entry, _needle) in _ENTRIES.items():
    def _bad_entry(w: Workspace, entry: dict = _entry, needle: str = _needle) -> Expect:
        bad = w.write("entry.safetensors", safetensors_bytes({"a": entry}, bytes(16)))
        return merge_with(w, bad, "'a'", needle)

    case(f"safetensors {_what}")(_bad_entry)


@case("safetensors shape written as 1e999 (JSON infinity)")
def _inf_dim(w: Workspace) -> Expect:
    raw = b'{"a":{"dtype":"F32","shape":[1e999],"data_offsets":[0,4]}}'
    return merge_with(w, w.write("inf.safetensors", safetensors_bytes(None, bytes(4), raw_header=raw)), "bad shape")


# --- escapes from a checkpoint folder -----------------------------------------------------------------------------


def _retarget(w: Workspace, target: str | None = None, link_to: Path | str | None = None,
              index: Path | None = None) -> tuple[Path, str]:
    """A sharded checkpoint (``index``, or a new one) whose first shard is replaced by a symlink to ``link_to``
    (or whose index names ``target`` for it)."""
    if index is None:
        index, _ = _sharded(w)
    content = json.loads(index.read_text())
    first = sorted(set(content["weight_map"].values()))[0]
    if link_to is not None:
        (index.parent / first).unlink()
        (index.parent / first).symlink_to(link_to)
        return index, first
    assert target is not None
    for key, shard in content["weight_map"].items():
        if shard == first:
            content["weight_map"][key] = target
    index.write_text(json.dumps(content))
    return index, target


@case("index shard is a symlink to a checkpoint outside the folder")
def _shard_link_out(w: Workspace) -> Expect:
    index, shard = _retarget(w, link_to=w.good("outside.safetensors"))
    return merge_with(w, index, f"shard {shard!r}", "outside the checkpoint folder")


@case("index shard is a symlink to a secret file outside the folder")
def _shard_link_secret(w: Workspace) -> Expect:
    secret = w.write("secret.txt", b"hunter2-password-of-someone-else\n")
    index, shard = _retarget(w, link_to=secret)
    expect = merge_with(w, index, f"shard {shard!r}", "outside the checkpoint folder")
    expect.absent = ("hunter2", str(int.from_bytes(b"hunter2-", "little")))
    return expect


@case("index shard is a relative symlink chain leaving the folder")
def _shard_link_chain(w: Workspace) -> Expect:
    w.good("outside.safetensors")
    index, _ = _sharded(w)
    (index.parent / "hop.safetensors").symlink_to("../outside.safetensors")
    index, shard = _retarget(w, link_to="hop.safetensors", index=index)
    return merge_with(w, index, f"shard {shard!r}", "outside the checkpoint folder")


@case("index shard is a symlink loop")
def _shard_link_loop(w: Workspace) -> Expect:
    index, _ = _sharded(w)
    (index.parent / "loop_b.safetensors").symlink_to("loop_a.safetensors")
    (index.parent / "loop_a.safetensors").symlink_to("loop_b.safetensors")
    _retarget(w, target="loop_a.safetensors", index=index)
    return merge_with(w, index, "shard 'loop_a.safetensors'", "cannot be resolved")


@case("index naming itself as a shard")
def _index_self(w: Workspace) -> Expect:
    index, _ = _sharded(w)
    _retarget(w, target=index.name, index=index)
    return merge_with(w, index, f"shard {index.name!r}", "is an index")


@case("two indexes naming each other")
def _index_cycle(w: Workspace) -> Expect:
    index, _ = _sharded(w)
    other = index.with_name("other.safetensors.index.json")
    other.write_text(json.dumps({"weight_map": {"x": index.name}}))
    _retarget(w, target=other.name, index=index)
    return merge_with(w, index, f"shard {other.name!r}", "is an index")


@case("index shard that is a symlink to the index")
def _shard_link_index(w: Workspace) -> Expect:
    index, shard = _retarget(w, link_to="model.safetensors.index.json")
    return merge_with(w, index, f"shard {shard!r}", "is an index")


@case("index naming an empty shard name")
def _shard_empty_name(w: Workspace) -> Expect:
    index, _ = _retarget(w, target="")
    return merge_with(w, index, "shard ''")


@case("index shard that is a folder")
def _shard_folder(w: Workspace) -> Expect:
    index, _ = _sharded(w)
    (index.parent / "sub").mkdir()
    _retarget(w, target="sub", index=index)
    return merge_with(w, index, "shard 'sub'", "not a regular file")


@case("index shard that is a FIFO")
def _shard_fifo(w: Workspace) -> Expect:
    index, _ = _sharded(w)
    os.mkfifo(index.parent / "pipe.safetensors")
    _retarget(w, target="pipe.safetensors", index=index)
    return merge_with(w, index, "shard 'pipe.safetensors'", "not a regular file")


@case("text file posing as safetensors (first 8 bytes never echoed)")
def _foreign_as_safetensors(w: Workspace) -> Expect:
    bad = w.write("notes.safetensors", b"hunter2-and-more-private-text-" * 4)
    expect = merge_with(w, bad, "not a valid safetensors file")
    expect.absent = ("hunter2", str(int.from_bytes(b"hunter2-", "little")))
    return expect


@case("text file posing as a .pt (its bytes never echoed)")
def _foreign_as_pt(w: Workspace) -> Expect:
    bad = w.write("notes.pt", b"root:x:0:0:root:/root:/bin/bash\n" * 3)
    expect = merge_with(w, bad, "not a valid torch checkpoint")
    expect.absent = ("root:x", str(int.from_bytes(b"oot:", "little")))
    return expect


# --- odd files as inputs: refused before any open, never a hang --------------------------------------------------


def _fifo(w: Workspace, name: str) -> Path:
    path = w.root / name
    os.mkfifo(path)
    return path


for _name in ("pipe.safetensors", "pipe.pt", "model.safetensors.index.json"):
    def _fifo_input(w: Workspace, name: str = _name) -> Expect:
        return merge_with(w, _fifo(w, name), "is a FIFO")

    case(f"FIFO as an input ({_name})")(_fifo_input)


@case("folder whose only checkpoint is a FIFO")
def _fifo_folder(w: Workspace) -> Expect:
    folder = w.root / "run"
    folder.mkdir()
    os.mkfifo(folder / "weights.safetensors")
    return merge_with(w, folder, "weights.safetensors", "is a FIFO")


@case("folder whose only checkpoint is a symlink loop")
def _loop_folder(w: Workspace) -> Expect:
    folder = w.root / "run"
    folder.mkdir()
    (folder / "model.pt").symlink_to("model.pt")
    return merge_with(w, folder, "model.pt", "symbolic links")


@case("FIFO as the --base")
def _fifo_base(w: Workspace) -> Expect:
    bad = _fifo(w, "base.safetensors")
    return Expect(["merge", *_two(w), "--method", "task_arithmetic", "--base", str(bad), "-o", w.out],
                  (str(bad), "is a FIFO"), w.canary)


@case("FIFO to inspect")
def _fifo_inspect(w: Workspace) -> Expect:
    bad = _fifo(w, "pipe.safetensors")
    return Expect(["inspect", str(bad)], (str(bad), "is a FIFO"), w.canary)


@case("character device as an input (/dev/zero)")
def _dev_zero(w: Workspace) -> Expect:
    return merge_with(w, Path("/dev/zero"), "is a device")


@case("symlink to /dev/urandom named like a checkpoint")
def _dev_link(w: Workspace) -> Expect:
    link = w.root / "random.pt"
    link.symlink_to("/dev/urandom")
    return merge_with(w, link, "is a device")


@case("UNIX socket as an input")
def _socket_input(w: Workspace) -> Expect:
    path = w.root / "s.safetensors"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return merge_with(w, path, "is a socket")


@case("FIFO as a merge config")
def _fifo_config(w: Workspace) -> Expect:
    config = _fifo(w, "merge.yaml")
    # merging/config.py (the lead's) says "no such merge config file" for it: the file is named, nothing hangs
    return Expect(["merge", "--config", str(config), "-o", w.out], (str(config),), w.canary)


@case("FIFO as an eval recipe (soupkit eval)")
def _fifo_recipe(w: Workspace) -> Expect:
    recipe = _fifo(w, "recipe.yaml")
    return Expect(["eval", str(w.good()), "--eval", str(recipe)], (str(recipe), "not a regular file"),
                  w.canary)


# --- names --------------------------------------------------------------------------------------------------------

LONG = "x" * 256


@case("output file name over 255 bytes (.safetensors)")
def _long_output(w: Workspace) -> Expect:
    out = str(w.root / f"{LONG}.safetensors")
    return Expect(["merge", *_two(w), "-o", out], (out, "at most 255"), w.canary)


@case("output file name over 255 bytes (.pt)")
def _long_output_pt(w: Workspace) -> Expect:
    out = str(w.root / f"{LONG}.pt")
    return Expect(["convert", str(w.good()), out], (out, "at most 255"), w.canary)


@case("output file name over 255 bytes in UTF-8 (100 x 'é' x 2)")
def _long_output_utf8(w: Workspace) -> Expect:
    out = str(w.root / ("é" * 130 + ".safetensors"))  # 130 characters, 272 bytes
    return Expect(["merge", *_two(w), "-o", out], (out, "272 bytes"), w.canary)


@case("output folder name over 255 bytes")
def _long_folder(w: Workspace) -> Expect:
    out = str(w.root / LONG / LONG / "soup.safetensors")
    return Expect(["merge", *_two(w), "-o", out], (out, "at most 255"), w.canary)


@case("sharded output whose shard names pass 255 bytes")
def _long_shards(w: Workspace) -> Expect:
    out = str(w.root / ("s" * 235 + ".safetensors"))  # 247 bytes; its shards and index are longer
    return Expect(["merge", *_two(w), "--shard-size", "40", "-o", out], ("at most 255",), w.canary)


@case("input file name over 255 bytes")
def _long_input(w: Workspace) -> Expect:
    return merge_with(w, w.root / f"{LONG}.safetensors", "File name too long")


@case("merge config name over 255 bytes")
def _long_config(w: Workspace) -> Expect:
    config = str(w.root / f"{LONG}.yaml")
    return Expect(["merge", "--config", config, "-o", w.out], (config, "File name too long"), w.canary)


@case("eval recipe name over 255 bytes (soupkit eval)")
def _long_recipe(w: Workspace) -> Expect:
    recipe = str(w.root / f"{LONG}.yaml")
    return Expect(["eval", str(w.good()), "--eval", recipe], (recipe, "File name too long"), w.canary)


@case("--base name over 255 bytes")
def _long_base(w: Workspace) -> Expect:
    base = str(w.root / f"{LONG}.safetensors")
    return Expect(["merge", *_two(w), "--method", "task_arithmetic", "--base", base, "-o", w.out],
                  (base, "File name too long"), w.canary)


@case("input path through a symlink loop")
def _loop_input(w: Workspace) -> Expect:
    (w.root / "loop1").symlink_to("loop2")
    (w.root / "loop2").symlink_to("loop1")
    return merge_with(w, w.root / "loop1" / "model.safetensors")


def _surrogate_pt(w: Workspace, name: str = "surrogate.pt") -> Path:
    state = small_state()
    state["bad\udc80key"] = state.pop("layer.bias")
    return w.pickle(name, state, "zip")


@case("tensor key with a lone surrogate (.pt to safetensors)")
def _surrogate_convert(w: Workspace) -> Expect:
    bad = _surrogate_pt(w)
    return Expect(["convert", str(bad), w.out], (w.out, "'bad\\udc80key'", "lone surrogate"), w.canary)


@case("tensor key with a lone surrogate (merging two .pt)")
def _surrogate_merge(w: Workspace) -> Expect:
    a, b = _surrogate_pt(w, "a.pt"), _surrogate_pt(w, "b.pt")
    return Expect(["merge", str(a), str(b), "-o", w.out], ("'bad\\udc80key'", "lone surrogate"), w.canary)


@case("tensor key with a lone surrogate (safetensors JSON escape)")
def _surrogate_st(w: Workspace) -> Expect:
    raw = b'{"bad\\udc80":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    bad = w.write("surrogate.safetensors", safetensors_bytes(None, bytes(4), raw_header=raw))
    return Expect(["convert", str(bad), w.out], (str(bad), "'bad\\udc80'", "lone surrogate"), w.canary)


@case("safetensors metadata with a lone surrogate escape (inspect)")
def _surrogate_meta(w: Workspace) -> Expect:
    raw = b'{"__metadata__":{"note":"x\\ud800y"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    bad = w.write("surrogate_meta.safetensors", safetensors_bytes(None, bytes(4), raw_header=raw))
    return Expect(["inspect", str(bad)], (str(bad), "'x\\ud800y'", "lone surrogate"), w.canary)


# --- YAML alias bombs ---------------------------------------------------------------------------------------------

LAUGHS = "".join(
    f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 9) if i else ', '.join(['lol'] * 9)}]\n"
    for i in range(10)
)  # nine levels of nine aliases: 3.5e9 values once expanded


@bomb("merge config YAML alias bomb (billion laughs)")
def _config_laughs(w: Workspace) -> Expect:
    config = w.write("merge.yaml", ("method: uniform\n" + LAUGHS).encode())
    return Expect(["merge", "--config", str(config), "-o", w.out], (str(config), "aliases"), w.canary)


@case("merge config YAML recursive alias")
def _config_recursive(w: Workspace) -> Expect:
    config = w.write("merge.yaml", b"method: uniform\nmodels: &m [*m]\n")
    return Expect(["merge", "--config", str(config), "-o", w.out], (str(config), "aliases"), w.canary)


@bomb("eval recipe YAML alias bomb (greedy soup)")
def _recipe_laughs_greedy(w: Workspace) -> Expect:
    recipe = w.write("recipe.yaml", LAUGHS.encode())
    return Expect(["merge", *_two(w), "--method", "greedy", "--eval", str(recipe), "-o", w.out],
                  (str(recipe), "aliases"), w.canary)


@bomb("eval recipe YAML alias bomb (soupkit eval)")
def _recipe_laughs(w: Workspace) -> Expect:
    recipe = w.write("recipe.yaml", LAUGHS.encode())
    return Expect(["eval", str(w.good()), "--eval", str(recipe)], (str(recipe), "aliases"), w.canary)


# --- options asking for unbounded work ----------------------------------------------------------------------------


def _option(name: str, extra: list[str], *needles: str, command: str = "merge") -> None:
    def build(w: Workspace) -> Expect:
        if command == "convert":
            return Expect(["convert", str(w.good()), w.out, *extra], needles, w.canary)
        return Expect([command, *_two(w), *extra, "-o", w.out], needles, w.canary)

    bomb(name)(build)


_option("wise --alpha 0:1:1e-9 (a billion merges)", ["--alpha", "0:1:1e-9"], "--alpha", "more than 1000",
        command="wise")
_option("wise --alpha -1e308:1e308:1e-308 (overflows to inf)", ["--alpha", "-1e308:1e308:1e-308"], "--alpha",
        "more than 1000", command="wise")
_option("wise --alpha 0:1e-300:1e-310 (subnormal step)", ["--alpha", "0:1e-300:1e-310"], "--alpha",
        "more than 1000", command="wise")
_option("wise --alpha list of 1001 values", ["--alpha", ",".join(str(i / 1000) for i in range(1001))], "--alpha",
        "at most 1000", command="wise")
_option("--shard-size inf", ["--shard-size", "inf"], "--shard-size", "'inf'", "finite")
_option("--shard-size 1e400GB", ["--shard-size", "1e400GB"], "--shard-size", "'1e400GB'")
_option("--shard-size nan", ["--shard-size", "nan"], "--shard-size", "'nan'")
_option("--shard-size 1e30", ["--shard-size", "1e30"], "--shard-size", "8 PiB")
_option("--shard-size 10000TB", ["--shard-size", "10000TB"], "--shard-size", "8 PiB")
_option("convert --shard-size -inf", ["--shard-size", "-inf"], "--shard-size", command="convert")
