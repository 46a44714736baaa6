"""The on-disk score cache: one small JSON file per (checkpoint content, recipe dataset definition).

Location: ``cache_dir`` argument, else ``$SOUPKIT_CACHE_DIR``, else ``~/.cache/soupkit/scores``. Each entry is
written to a temporary file and renamed into place, so an interrupted run, or two processes sharing the cache,
leave either the old state or a complete entry. Entries hold the counts, the mean loss and the per-example
correctness mask (bit-packed), or for log-likelihood datasets the token count and per-example values (float32).
Nothing is unpickled.

What a key covers (issue 26, class 9: never serve a stale score): the checkpoint's content (every byte, sha256,
streamed), and for a LoRA adapter also the content of the base weights it is applied to; the recipe's dataset key
(``Recipe.dataset_key``: the model definition, the content of the data files, the config and tokenizer files,
precision, device type, memory format and soupkit's version).

An entry is trusted only after checks (issue 26, class 8): its size is bounded before it is read, it carries a
blake2b checksum over everything else in it, and every size field is checked against the bytes actually there
before anything is allocated (an entry claiming n = 10^9 over a 10-byte mask is refused without allocating
10^9 of anything). A failing entry is a miss: the checkpoint is scored again, the entry rewritten, and the
problem said once per process. A cache folder that cannot be written (read-only, full) never fails an
evaluation: scores are computed, not stored, and that is said once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import OutputError
from soupkit.io.atomic import atomic_write_text

#: an entry holds ~1.4 bytes per example of a mask or ~5.4 per log-likelihood value: 256 MiB is 40M examples
MAX_ENTRY_BYTES = 256 << 20
#: bump when the layout of an entry changes (older entries become misses)
ENTRY_FORMAT = 2
#: problems said once per process (a corrupt entry, a cache that cannot be written)
_said: set[str] = set()


def say_once(kind: str, message: str) -> None:
    """Warn ``message`` the first time a problem of ``kind`` happens in this process."""
    if kind not in _said:
        _said.add(kind)
        warnings.warn(message, stacklevel=3)


def default_cache_dir() -> Path:
    env = os.environ.get("SOUPKIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "soupkit" / "scores"


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes, in key order (device tensors are copied to the
    host for hashing)."""
    digest = hashlib.blake2b(digest_size=20)
    for key in sorted(state):
        tensor = state[key].detach()
        # surrogatepass: a key from a pickle may hold a lone surrogate; valid keys hash as before
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode("utf-8", "surrogatepass"))
        if tensor.numel():
            flat = tensor.reshape(-1).contiguous().cpu().view(torch.uint8)
            digest.update(flat.numpy().data)
    return "blake2b:" + digest.hexdigest()


def source_fingerprint(source: Any, base: Any = None) -> str:
    """Content fingerprint of a checkpoint path (soupkit.io's, memoised per file) or an in-memory state dict;
    with ``base`` (the weights a LoRA adapter is applied to), of the pair: the same adapter on other base weights
    scores differently."""
    if isinstance(source, Mapping):
        own = state_fingerprint(source)
    else:
        from soupkit.io import fingerprint

        own = fingerprint(source)
    if base is None:
        return own
    return f"{own}+base:{source_fingerprint(base)}"


def _checksum(entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "checksum"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


class _Bad(Exception):
    """An entry failed a check (the reason is said once)."""


def _decoded(text: Any, size: int, what: str) -> bytes:
    """``text`` (base64) decoded, after checking that it holds exactly ``size`` bytes (nothing allocated first)."""
    if not isinstance(text, str) or len(text) != 4 * math.ceil(size / 3):
        raise _Bad(f"{what} does not hold the {size} bytes its count says")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _Bad(f"{what} is not base64") from None
    if len(data) != size:
        raise _Bad(f"{what} does not hold the {size} bytes its count says")
    return data


def _count(entry: Mapping[str, Any], key: str, upper: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= upper:
        raise _Bad(f"{key} is not a count in 0..{upper}")
    return value


class ScoreCache:
    """Get / put per-dataset scores keyed by (checkpoint fingerprint, dataset key)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir()

    def _path(self, checkpoint: str, dataset_key: str) -> Path:
        name = hashlib.blake2b(f"{checkpoint}|{dataset_key}".encode(), digest_size=20).hexdigest()
        return self.folder / name[:2] / f"{name}.json"

    def get(self, checkpoint: str, dataset_key: str) -> dict[str, Any] | None:
        """The entry, checked; None when absent or when it fails a check (said once: it is scored again)."""
        path = self._path(checkpoint, dataset_key)
        try:
            return _parse(_read_bounded(path), checkpoint, dataset_key)
        except OSError:
            return None  # absent, unreadable, or a link: a plain miss (put replaces a link, never its target)
        except _Bad as problem:
            say_once("corrupt", f"score cache: {path}: ignored ({problem}); scoring again and rewriting it")
            return None

    def put(self, checkpoint: str, dataset_key: str, *, correct: int | None, n: int, loss: float | None,
            mask: torch.Tensor | None, seconds: float, dataset: str, values: torch.Tensor | None = None,
            tokens: int | None = None) -> None:
        """Store a score: ``correct`` + ``mask`` (accuracy), or ``values`` + ``tokens`` (log-likelihood)."""
        import numpy as np

        entry: dict[str, Any] = {"format": ENTRY_FORMAT, "checkpoint": checkpoint, "dataset_key": dataset_key,
                                 "dataset": dataset, "n": int(n), "loss": loss, "seconds": seconds}
        if values is not None:
            raw = values.to("cpu", torch.float32).numpy().astype("<f4").tobytes()
            entry.update(metric="log_likelihood", tokens=tokens, values=base64.b64encode(raw).decode())
        else:
            assert mask is not None and correct is not None
            packed = np.packbits(mask.to(torch.bool).cpu().numpy())
            entry.update(metric="accuracy", correct=int(correct), mask=base64.b64encode(packed.tobytes()).decode())
        entry["checksum"] = _checksum(entry)
        path = self._path(checkpoint, dataset_key)
        try:
            atomic_write_text(path, json.dumps(entry))
        except OutputError as error:  # a read-only or full cache disk must not fail an evaluation
            say_once("unwritable", f"score cache: {error}; scores are computed but not stored")


def _read_bounded(path: Path) -> bytes:
    """An entry's bytes: a regular file not reached through a link (never a FIFO or a device), at most
    ``MAX_ENTRY_BYTES``; anything else raises ``_Bad``. A missing entry raises ``OSError``."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Bad("not a regular file")
        if info.st_size > MAX_ENTRY_BYTES:
            raise _Bad(f"larger than {MAX_ENTRY_BYTES >> 20} MiB")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(MAX_ENTRY_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_ENTRY_BYTES:  # grew while it was read
        raise _Bad(f"larger than {MAX_ENTRY_BYTES >> 20} MiB")
    return raw


def _parse(raw: bytes, checkpoint: str, dataset_key: str) -> dict[str, Any]:
    """An entry's JSON, every field checked (raises ``_Bad`` naming the first problem)."""
    import numpy as np

    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, bad UTF-8, a 5,000-digit number, nested too deeply
        raise _Bad("not a JSON entry (truncated or edited)") from None
    if not isinstance(entry, dict):
        raise _Bad("not a JSON object")
    if entry.get("format") != ENTRY_FORMAT:
        raise _Bad("written in another format")
    if entry.get("checksum") != _checksum(entry):
        raise _Bad("checksum mismatch: truncated or edited")
    if entry.get("checkpoint") != checkpoint or entry.get("dataset_key") != dataset_key:
        raise _Bad("its key does not match its name")
    n = _count(entry, "n", MAX_ENTRY_BYTES * 8)
    loss = entry.get("loss")
    if loss is not None and not (isinstance(loss, (int, float)) and not isinstance(loss, bool)
                                 and math.isfinite(loss)):
        raise _Bad("loss is not a finite number")
    if entry.get("metric") == "log_likelihood":
        values = np.frombuffer(_decoded(entry.get("values"), 4 * n, "values"), dtype="<f4")
        entry["tokens"] = _count(entry, "tokens", 1 << 62)
        entry["values"] = torch.from_numpy(values.copy())
        return entry
    if entry.get("metric") != "accuracy":
        raise _Bad("unknown metric")
    bits = np.frombuffer(_decoded(entry.get("mask"), (n + 7) // 8, "mask"), dtype=np.uint8)
    mask = np.unpackbits(bits, count=n).astype(bool)
    correct = _count(entry, "correct", n)
    if int(mask.sum()) != correct:
        raise _Bad("correct does not match the mask")
    entry["correct_mask"] = torch.from_numpy(mask)
    return entry
