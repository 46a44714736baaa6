"""What is in a checkpoint, and how two checkpoints differ: the library behind ``soupkit inspect``."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import CheckpointError
from soupkit.io import TORCH_SUFFIXES, CheckpointSource, open_checkpoint
from soupkit.io.base import CheckpointReader
from soupkit.merging.api import write_checkpoint


def describe(source: CheckpointSource, *, ema: bool = False) -> dict[str, Any]:
    """Summary of a checkpoint from its header alone: tensors, parameters, dtypes, bytes, metadata."""
    reader = open_checkpoint(source, ema=ema)
    try:
        infos = reader.infos()
        by_dtype: Counter[str] = Counter()
        params_by_dtype: Counter[str] = Counter()
        bytes_by_dtype: Counter[str] = Counter()
        for info in infos.values():
            name = str(info.dtype).replace("torch.", "")
            by_dtype[name] += 1
            params_by_dtype[name] += info.numel
            bytes_by_dtype[name] += info.nbytes
        metadata = reader.metadata
        tied = reader.tied_keys()
        return {
            "name": reader.name,
            "format": _format_name(reader),
            "file_size": reader.file_size,
            "tensors": len(infos),
            # a tied weight (lm_head = embeddings) is one parameter tensor under two names: counted once
            "parameters": sum(i.numel for k, i in infos.items() if k not in tied),
            "tied": tied,
            "ema": None if ema else _ema_weights(source),
            "tensor_bytes": sum(i.nbytes for i in infos.values()),
            "dtypes": {d: {"tensors": by_dtype[d], "parameters": params_by_dtype[d], "bytes": bytes_by_dtype[d]}
                       for d in sorted(by_dtype)},
            "metadata": {k: _maybe_json(v) for k, v in metadata.items()},
            "keys": [{"key": k, "shape": list(i.shape), "dtype": str(i.dtype).replace("torch.", ""),
                      "bytes": i.nbytes} for k, i in infos.items()],
        }
    finally:
        reader.close()


def _format_name(reader: CheckpointReader) -> str:
    named = getattr(reader, "format_name", None)
    if named is not None:
        return named
    inner = getattr(reader, "inner", reader)  # a renamed view (tied keys, prefixes) reports the file's format
    return type(inner).__name__.replace("Reader", "").lower()


def _ema_weights(source: CheckpointSource) -> bool | None:
    """Whether a torch checkpoint also holds EMA weights (timm's ``state_dict_ema``...; ``--ema`` picks them);
    None where the question does not apply (safetensors, folders, state dicts)."""

    if not isinstance(source, (str, Path)) or Path(source).suffix.lower() not in TORCH_SUFFIXES:
        return None
    try:
        with open_checkpoint(source, ema=True):
            return True
    except CheckpointError as err:
        return False if "no EMA weights found" in str(err) else None  # None: the file itself is unreadable


def _maybe_json(value: str) -> Any:
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than Python's stack
            pass
    return value


@dataclass
class TensorDiff:
    """How one tensor differs between two checkpoints."""

    key: str
    status: str  # "same", "changed", "shape", "only_a", "only_b"
    l2: float | None = None  # ||a - b||
    relative_l2: float | None = None  # ||a - b|| / ||a||
    cosine: float | None = None
    max_abs: float | None = None


def diff(a: CheckpointSource, b: CheckpointSource) -> dict[str, Any]:
    """Per-tensor L2 distance, relative L2 and cosine similarity between two checkpoints (one tensor at a time)."""
    left, right = open_checkpoint(a), open_checkpoint(b)
    try:
        compared = _diff_rows(left, right)
    finally:
        left.close()
        right.close()
    rows = sorted((row for row, _ in compared), key=lambda r: STATUS_ORDER.index(r.status))  # stable
    dot, sum_sq_a, sum_sq_b, sum_sq_d = (sum(s[i] for _, s in compared if s) for i in range(4))
    shared = sum(1 for _, s in compared if s)  # float tensors present in both with the same shape
    total = {
        "shared_float_tensors": shared,
        "l2": sum_sq_d ** 0.5 if shared else None,
        "relative_l2": (sum_sq_d ** 0.5) / (sum_sq_a ** 0.5) if shared and sum_sq_a else None,
        "cosine": dot / ((sum_sq_a * sum_sq_b) ** 0.5) if shared and sum_sq_a and sum_sq_b else None,
    }
    counts = Counter(r.status for r in rows)
    return {"a": left.name, "b": right.name, "summary": total, "counts": dict(counts),
            "tensors": [asdict(r) for r in rows]}


#: the order ``diff`` lists tensors in: what differs first, what is identical (often integer buffers) last
STATUS_ORDER = ("changed", "shape", "only_a", "only_b", "same")


def _diff_rows(left: CheckpointReader, right: CheckpointReader) -> list[tuple[TensorDiff, tuple | None]]:
    """Each row with the float tensors' (a.b, a.a, b.b, d.d) sums, for the whole-model summary."""
    rows: list[tuple[TensorDiff, tuple | None]] = []
    right_keys = set(right.keys())
    for key in left.keys():
        if key not in right_keys:
            rows.append((TensorDiff(key, "only_a"), None))
            continue
        info_a, info_b = left.info(key), right.info(key)
        if info_a.shape != info_b.shape:
            rows.append((TensorDiff(key, "shape"), None))
            continue
        ta, tb = left.get(key), right.get(key)
        if not (info_a.is_float and info_b.is_float):
            rows.append((TensorDiff(key, "same" if torch.equal(ta, tb) else "changed"), None))
            continue
        xa, xb = ta.double().reshape(-1), tb.double().reshape(-1)
        delta = xa - xb
        sums = (float(xa @ xb), float(xa @ xa), float(xb @ xb), float(delta @ delta))
        norm_a, norm_b = sums[1] ** 0.5, sums[2] ** 0.5
        row = TensorDiff(
            key,
            "same" if sums[3] == 0 else "changed",
            l2=sums[3] ** 0.5,
            relative_l2=(sums[3] ** 0.5) / norm_a if norm_a else None,
            cosine=sums[0] / (norm_a * norm_b) if norm_a and norm_b else None,
            max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
        )
        rows.append((row, sums))
    left_keys = set(left.keys())
    rows.extend((TensorDiff(k, "only_b"), None) for k in right.keys() if k not in left_keys)
    return rows


def convert(source: CheckpointSource, output: str | Path, **options: Any) -> Path:
    """Rewrite any readable checkpoint (e.g. a pickled wise-ft ``.pt``) as safetensors, one tensor at a time;
    ``options``: the output options (dtype, shard_size, ema, force, ...)."""

    return write_checkpoint(source, output, record_as="convert", **options)
