"""What is in a checkpoint, and how two checkpoints differ: the library behind ``soupkit inspect``."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from soupkit.io import CheckpointSource, open_checkpoint
from soupkit.io.base import CheckpointReader


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
        return {
            "name": reader.name,
            "format": type(reader).__name__.replace("Reader", "").lower(),
            "file_size": reader.file_size,
            "tensors": len(infos),
            "parameters": sum(i.numel for i in infos.values()),
            "tensor_bytes": sum(i.nbytes for i in infos.values()),
            "dtypes": {d: {"tensors": by_dtype[d], "parameters": params_by_dtype[d], "bytes": bytes_by_dtype[d]}
                       for d in sorted(by_dtype)},
            "metadata": {k: _maybe_json(v) for k, v in metadata.items()},
            "keys": [{"key": k, "shape": list(i.shape), "dtype": str(i.dtype).replace("torch.", ""),
                      "bytes": i.nbytes} for k, i in infos.items()],
        }
    finally:
        reader.close()


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
    rows = [row for row, _ in compared]
    dot, sum_sq_a, sum_sq_b, sum_sq_d = (sum(s[i] for _, s in compared if s) for i in range(4))
    total = {
        "l2": sum_sq_d ** 0.5,
        "relative_l2": (sum_sq_d ** 0.5) / (sum_sq_a ** 0.5) if sum_sq_a else None,
        "cosine": dot / ((sum_sq_a * sum_sq_b) ** 0.5) if sum_sq_a and sum_sq_b else None,
    }
    counts = Counter(r.status for r in rows)
    return {"a": left.name, "b": right.name, "summary": total, "counts": dict(counts),
            "tensors": [asdict(r) for r in rows]}


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


def convert(source: CheckpointSource, output: str | Path, *, dtype: str | None = None, ema: bool = False,
            force: bool = False, shard_size: int | None = None) -> Path:
    """Rewrite any readable checkpoint (e.g. a pickled wise-ft ``.pt``) as safetensors, one tensor at a time."""
    from soupkit.io import CheckpointSink, OutputSet, check_output_path, input_files, provenance_metadata
    from soupkit.io.provenance import ingredient_record
    from soupkit.merging.engine import output_plan, parse_dtype

    reader = open_checkpoint(source, ema=ema)
    try:
        protected = input_files(reader)
        out = check_output_path(output, inputs=protected, force=force)
        target = parse_dtype(dtype)
        keys = reader.keys()
        metadata = provenance_metadata("convert", {"dtype": dtype, "ema": ema},
                                       [ingredient_record(reader.name, reader.path, reader.nbytes)])
        with OutputSet() as files:
            sink = CheckpointSink(out, output_plan([reader], keys, target), metadata, files, shard_size,
                                  protect=protected, force=force)
            for key in keys:
                sink.write(key, reader.get(key).to(sink.dtype_of(key)).reshape(-1))
            result = sink.finish()
        assert isinstance(result, Path)
        return result
    finally:
        reader.close()
