"""Content fingerprints and the provenance metadata soupkit writes into every output.

``fingerprint`` hashes the full content (sha256) and is what caches key on: two checkpoints that differ in a
single weight must never share a score. It is memoised per process on (device, inode, size, mtime, ctime): a
file rewritten in place keeping its size and mtime (``os.utime``) still gets a new ctime, which no user can set
back; and a hash is memoised only once the file's ctime is ``_SETTLED_NS`` old, so a rewrite within the file
system's timestamp granularity (coarse clocks tick every few ms) cannot reuse it ("racy git" timestamps).
``quick_fingerprint`` samples the file (header, head, tail and evenly spaced blocks) so recording provenance for
a 30 GB soup costs milliseconds; it identifies an ingredient, it does not prove its integrity.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from soupkit._version import __version__
from soupkit.io.safetensors_io import tensor_bytes
from soupkit.io.small_files import check_small_file

_BLOCK = 1 << 20
_SAMPLES = 32
_memo: dict[tuple[int, int, int, int, int], str] = {}
#: a hash is memoised only for a file whose last change is at least this old (2 s: every file system's ctime
#: granularity is finer, FAT's mtime is 2 s)
_SETTLED_NS = 2_000_000_000


def _stat_key(path: Path) -> tuple[int, int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _files_of(path: Path) -> list[Path]:
    """The files that make up a checkpoint: itself, or the shards an index names (plus the index)."""
    if path.is_dir():  # a link out of the folder, a FIFO or /proc file is never read (soupkit.io.small_files)

        files = []
        for p in sorted(path.iterdir()):
            weights = p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json"))
            if weights and p.is_file():
                files.append(p)  # weights are read under the inputs' policy (links followed, SECURITY.md)
            elif not weights and not p.name.startswith(".") and (p.is_symlink() or p.is_file()):
                check_small_file(path, p.name, limit=2**63)
                files.append(p)
        return files
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text()).get("weight_map", {})
            return [path, *sorted({path.parent / name for name in weight_map.values()})]
        except (OSError, ValueError, AttributeError):
            return [path]
    return [path]


def fingerprint(source: str | Path | Mapping[str, torch.Tensor]) -> str:
    """Full-content sha256 of a checkpoint file (or of an in-memory state dict's keys, dtypes and bytes)."""
    if isinstance(source, Mapping):
        digest = hashlib.sha256()
        for key in sorted(source):
            tensor = source[key].detach()
            # surrogatepass: a key may hold a lone surrogate (from a pickle); it still hashes, and distinctly
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode("utf-8", "surrogatepass"))
            if tensor.numel():
                digest.update(tensor_bytes(tensor.cpu()))
        return "sha256:" + digest.hexdigest()
    path = Path(source)
    files = _files_of(path)
    if len(files) > 1:
        digest = hashlib.sha256("".join(fingerprint(f) for f in files).encode())
        return "sha256:" + digest.hexdigest()
    path = files[0] if files else path  # a folder holding one file (model.safetensors alone) is that file
    key = _stat_key(path)
    if key in _memo:
        return _memo[key]
    import time

    started = time.time_ns()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 * _BLOCK):
            digest.update(block)
    value = "sha256:" + digest.hexdigest()
    if key[4] < started - _SETTLED_NS and _stat_key(path) == key:  # settled, and unchanged while it was read
        _memo[key] = value
    return value


def quick_fingerprint(path: str | Path) -> str:
    """A cheap sampled sha256: file size, first and last MiB and 32 evenly spaced 64 KiB blocks."""
    path = Path(path)
    files = _files_of(path)
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(os.fsencode(file.name) + f"|{size}|".encode())  # fsencode: any name, even non-UTF-8
        with open(file, "rb") as handle:
            if size <= (_SAMPLES + 2) * _BLOCK:
                while block := handle.read(8 * _BLOCK):
                    digest.update(block)
                continue
            positions = [0, size - _BLOCK] + [size * i // (_SAMPLES + 1) for i in range(1, _SAMPLES + 1)]
            for position in positions:
                handle.seek(position)
                digest.update(handle.read(_BLOCK if position in (0, size - _BLOCK) else 1 << 16))
    return "sampled-sha256:" + digest.hexdigest()


def creation_time() -> str:
    """UTC ISO-8601 creation time; ``SOURCE_DATE_EPOCH`` makes it reproducible (byte-identical outputs)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch.strip().isdigit():
        moment = _dt.datetime.fromtimestamp(int(epoch), tz=_dt.timezone.utc)
    else:
        moment = _dt.datetime.now(tz=_dt.timezone.utc).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


#: file names that say nothing about the model: a Hugging Face / PEFT folder's ingredient is named by its folder
_GENERIC_NAMES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin",
                  "model.safetensors.index.json", "pytorch_model.bin.index.json")


def ingredient_name(path: Path) -> str:
    """How provenance names an input: its file name, or its folder's for a Hugging Face / PEFT folder's weights
    (``run-a/model.safetensors`` -> ``run-a``)."""
    if path.name in _GENERIC_NAMES and path.parent.name:
        return display_name(path.parent)
    return display_name(path)


def display_name(path: Path) -> str:
    """``path.name`` as valid Unicode: bytes of a non-UTF-8 file name (which Python holds as lone surrogates,
    unencodable in a safetensors header) shown as ``\\xff`` escapes."""
    return os.fsencode(path.name).decode("utf-8", "backslashreplace")


def ingredient_record(name: str, path: Path | None, nbytes: int, state: Mapping[str, Any] | None = None) -> dict:
    """One ingredient's entry in the provenance list."""
    if path is not None:
        return {"name": ingredient_name(path), "bytes": nbytes, "fingerprint": quick_fingerprint(path)}
    return {"name": name, "bytes": nbytes, "fingerprint": fingerprint(state) if state is not None else None}


def provenance_metadata(method: str, params: Mapping[str, Any], ingredients: list[dict],
                        extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``__metadata__`` soupkit writes: strings only (the safetensors format requires it)."""
    params, extra = portable_names((dict(params), dict(extra or {})))
    metadata = {
        "format": "pt",  # what transformers expects in safetensors metadata
        "soupkit.version": __version__,
        "soupkit.method": method,
        "soupkit.params": json.dumps(params, sort_keys=True, default=str),
        "soupkit.ingredients": json.dumps(ingredients, default=str),
        "soupkit.created": creation_time(),
    }
    for key, value in extra.items():
        metadata[key if "." in key else f"soupkit.{key}"] = value if isinstance(value, str) else json.dumps(
            value, sort_keys=True, default=str)
    return metadata


def portable_names(value: Any) -> Any:
    """``value`` (nested dicts / lists / tuples) with every file path in it replaced by a name: its path
    relative to the folder all the paths share (just the file name when they share one folder). Provenance
    records what went into a file, never where the files lay on the machine that made it."""
    paths = sorted({s for s in _strings(value) if _is_path(s)})
    if not paths:
        return value
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # absolute and relative paths mixed, or different drives
        root = ""
    names = {p: os.path.relpath(p, root) if root else os.path.basename(p) for p in paths}
    return _replace(value, names)


def _is_path(text: str) -> bool:
    if not text or "\n" in text:
        return False
    return os.path.isabs(text) or (os.sep in text and os.path.exists(text))


def _strings(value: Any) -> list[str]:
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _replace(value: Any, names: Mapping[str, str]) -> Any:
    if isinstance(value, (str, Path)):
        return names.get(str(value), value)
    if isinstance(value, Mapping):
        return {_replace(k, names): _replace(v, names) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_replace(v, names) for v in value)
    if isinstance(value, list):
        return [_replace(v, names) for v in value]
    return value
