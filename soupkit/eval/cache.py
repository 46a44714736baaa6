"""The on-disk score cache: one small JSON file per (checkpoint content, recipe dataset definition).

Location: ``cache_dir`` argument, else ``$SOUPKIT_CACHE_DIR``, else ``~/.cache/soupkit/scores``. Each entry is
written to a temporary file and renamed into place, so an interrupted run leaves either the old state or a
complete entry. Entries hold the counts, the mean loss and the per-example correctness mask (bit-packed), or
for log-likelihood datasets the token count and per-example values (float32); an unreadable entry is a miss.
Nothing is unpickled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import OutputError
from soupkit.io.atomic import atomic_write_text


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


def source_fingerprint(source: Any) -> str:
    """Content fingerprint of a checkpoint path (soupkit.io's, memoised per file) or an in-memory state dict."""
    if isinstance(source, Mapping):
        return state_fingerprint(source)
    from soupkit.io import fingerprint

    return fingerprint(source)


class ScoreCache:
    """Get / put per-dataset scores keyed by (checkpoint fingerprint, dataset key)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir()

    def _path(self, checkpoint: str, dataset_key: str) -> Path:
        name = hashlib.blake2b(f"{checkpoint}|{dataset_key}".encode(), digest_size=20).hexdigest()
        return self.folder / name[:2] / f"{name}.json"

    def get(self, checkpoint: str, dataset_key: str) -> dict[str, Any] | None:
        path = self._path(checkpoint, dataset_key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if entry.get("checkpoint") != checkpoint or entry.get("dataset_key") != dataset_key:
                return None
            n = int(entry["n"])
            import numpy as np

            if entry.get("metric") == "log_likelihood":
                values = np.frombuffer(base64.b64decode(entry["values"]), dtype="<f4")
                if len(values) != n:
                    return None
                entry["values"] = torch.from_numpy(values.copy())
                return entry
            bits = base64.b64decode(entry["mask"])
            mask = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n).astype(bool)
            entry["correct_mask"] = torch.from_numpy(mask)
            if int(entry["correct_mask"].sum()) != int(entry["correct"]):
                return None
            return entry
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, checkpoint: str, dataset_key: str, *, correct: int | None, n: int, loss: float | None,
            mask: torch.Tensor | None, seconds: float, dataset: str, values: torch.Tensor | None = None,
            tokens: int | None = None) -> None:
        """Store a score: ``correct`` + ``mask`` (accuracy), or ``values`` + ``tokens`` (log-likelihood)."""
        import numpy as np

        entry: dict[str, Any] = {"checkpoint": checkpoint, "dataset_key": dataset_key, "dataset": dataset,
                                 "n": int(n), "loss": loss, "seconds": seconds}
        if values is not None:
            raw = values.to("cpu", torch.float32).numpy().astype("<f4").tobytes()
            entry.update(metric="log_likelihood", tokens=tokens, values=base64.b64encode(raw).decode())
        else:
            assert mask is not None and correct is not None
            packed = np.packbits(mask.to(torch.bool).cpu().numpy())
            entry.update(correct=int(correct), mask=base64.b64encode(packed.tobytes()).decode())
        path = self._path(checkpoint, dataset_key)
        try:
            atomic_write_text(path, json.dumps(entry))
        except OutputError as error:  # a read-only or full cache disk must not fail an evaluation
            import warnings

            warnings.warn(f"score cache: {error}", stacklevel=3)
