"""The streaming merge engine.

1. Open every input lazily and check them against each other (keys, shapes, float-ness) before any tensor
   data is read; validate every output path.
2. Stream key by key. Elementwise methods get each tensor in flat chunks of ``chunk_elements`` (so memory
   stays flat in both the number of inputs and the size of the largest tensor); other methods get whole
   tensors. Reads run ahead on a thread pool, bounded by bytes, while the previous chunk is combined; large
   chunks of safetensors inputs are memory-mapped (no copy) and unmapped as soon as they are combined.
3. Floating tensors are upcast to float32 (float64 with ``precise``) on the compute device, combined by the
   method, cast to the output dtype and appended to every output. Integer and bool tensors are copied from the
   first input (a warning names keys where inputs disagree).
4. Outputs are published atomically at the end (see ``soupkit.io.atomic``).
"""

from __future__ import annotations

import fnmatch
import math
import threading
import typing
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soupkit.errors import IncompatibleCheckpointsError, NonFiniteError, ParameterError, suggest
from soupkit.io import CheckpointReader, CheckpointSink, TensorInfo
from soupkit.merging.registry import MergeMethod

#: default flat chunk for elementwise methods: 1M elements = 4 MB per fp32 operand, so a running mean's
#: accumulator stays in the CPU's cache while each input streams through it (measured fastest here vs 256K-16M)
DEFAULT_CHUNK_ELEMENTS = 1 << 20
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}


class SoupkitWarning(UserWarning):
    """Something worth telling the user that does not stop the merge."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16``; None keeps each tensor's input dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ParameterError(f"--dtype: unknown dtype {name!r}; choose fp32, fp16 or bf16") from None


@dataclass
class MergeOptions:
    """Everything about a merge except the method and its parameters."""

    dtype: torch.dtype | None = None
    precise: bool = False
    device: str = "cpu"
    allow_missing: bool = False
    allow_nonfinite: bool = False
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    read_ahead_bytes: int = 32 << 20
    progress: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorFiles:
    """Marks a per-model method parameter as auxiliary tensor files, one per input and keyed like the inputs
    (e.g. Fisher information): ``fishers: Annotated[list[str], TensorFiles("Fisher")]``. The parameter is
    given as paths; the engine opens and checks them before the merge and passes the method, in step with the
    inputs, a list holding each file's chunk of the same tensor (upcast like the inputs) or None where a file
    lacks the key."""

    what: str


def auxiliary_parameters(method: MergeMethod) -> dict[str, TensorFiles]:
    """The method's parameters marked ``TensorFiles``: name -> marker."""
    found: dict[str, TensorFiles] = {}
    for name, hint in typing.get_type_hints(method.fn, include_extras=True).items():
        for part in (hint, *typing.get_args(hint)):  # Annotated[...] or Annotated[...] | None
            marker = next((m for m in getattr(part, "__metadata__", ()) if isinstance(m, TensorFiles)), None)
            if marker is not None:
                found[name] = marker
    return found


@dataclass(frozen=True)
class Variant:
    """One output of a merge pass: the method's bound parameters and where the result goes."""

    params: dict[str, Any]
    sink: CheckpointSink


# --------------------------------------------------------------------------------------------- checking


def _short(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_compatible(readers: Sequence[CheckpointReader], *, allow_missing: bool,
                     base: CheckpointReader | None = None) -> list[str]:
    """Key order of the merge, after checking all inputs agree. Raises one error naming keys and files."""
    everyone = ([base] if base is not None else []) + list(readers)
    infos = [r.infos() for r in everyone]
    order = list(dict.fromkeys(k for info in infos for k in info))
    if not order:
        raise IncompatibleCheckpointsError(f"{everyone[0].name}: no tensors to merge (the checkpoints are empty)")
    for reader, info in zip(everyone, infos):
        missing = [k for k in order if k not in info]
        if missing and not (allow_missing and reader is not base):
            holder = next(r for r, i in zip(everyone, infos) if missing[0] in i)
            hint = "" if reader is base else " (--allow-missing merges each key over the inputs that have it)"
            raise IncompatibleCheckpointsError(
                f"{reader.name} lacks {len(missing)} key(s) that {holder.name} has: {_short(missing)}{hint}"
            )
    for key in order:
        holders = [(r, info[key]) for r, info in zip(everyone, infos) if key in info]
        first_reader, first = holders[0]
        for reader, other in holders[1:]:
            if other.shape != first.shape:
                raise IncompatibleCheckpointsError(
                    f"shape mismatch at {key!r}: {first_reader.name} has {tuple(first.shape)}, "
                    f"{reader.name} has {tuple(other.shape)}"
                )
            if other.is_float != first.is_float:
                raise IncompatibleCheckpointsError(
                    f"dtype mismatch at {key!r}: {first_reader.name} has {first.dtype}, {reader.name} has "
                    f"{other.dtype} (floating vs integer tensors cannot be merged)"
                )
    return order


def select_keys(keys: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> set[str]:
    """Keys the method merges; the rest are copied from the first input. Patterns are shell globs."""
    merged = {k for k in keys if not include or any(fnmatch.fnmatchcase(k, p) for p in include)}
    merged = {k for k in merged if not any(fnmatch.fnmatchcase(k, p) for p in exclude)}
    for pattern in (*include, *exclude):
        if not any(fnmatch.fnmatchcase(k, pattern) for k in keys):
            raise ParameterError(f"--include/--exclude pattern {pattern!r} matches no tensor name")
    return merged


def output_plan(
    readers: Sequence[CheckpointReader], keys: Sequence[str], dtype: torch.dtype | None
) -> list[TensorInfo]:
    """Shape and dtype of every output tensor: the first holder's, with ``dtype`` for floating tensors."""
    plan = []
    for key in keys:
        info = next(r.info(key) for r in readers if key in r)
        out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        plan.append(TensorInfo(key, info.shape, out_dtype))
    return plan


# --------------------------------------------------------------------------------------------- reading


class BufferPool:
    """Recycled read buffers. A buffer returns to the pool when the last tensor viewing it is freed, so pages
    stay resident and are reused instead of being faulted in afresh for every chunk, and memory stays bounded
    by what is actually alive (the read-ahead window plus the chunk being combined)."""

    def __init__(self, keep_bytes: int):
        self._free: list[np.ndarray] = []
        self._keep_bytes = keep_bytes
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, free in enumerate(self._free) if free.nbytes >= nbytes]
            slab = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes)) if fits else None
        if slab is None:
            slab = np.empty(max(nbytes, 1), dtype=np.uint8)
        view = slab[:nbytes]
        weakref.finalize(view, self._release, slab)
        return torch.from_numpy(view)

    def _release(self, slab: np.ndarray) -> None:
        with self._lock:
            self._free.append(slab)
            while sum(s.nbytes for s in self._free) > self._keep_bytes:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].nbytes))


class ReadAhead:
    """Runs reads in a fixed order on a small thread pool, keeping at most ``max_bytes`` in flight.

    ``preadv`` and torch copies release the GIL, so the next chunk is read while this one is combined.
    """

    #: chunks at least this big are memory-mapped where the reader can (safetensors on Linux): no copy, and the
    #: map is released with the chunk; smaller ones cost less to copy than to map and unmap
    MAP_MIN_BYTES = 256 << 10

    def __init__(self, requests: Iterator[tuple[CheckpointReader, str, int, int, int]], max_bytes: int):
        self._requests = requests
        self._max_bytes = max_bytes
        self._pending: deque[tuple[int, Future[torch.Tensor]]] = deque()
        self._in_flight = 0
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="soupkit-read")
        self._buffers = BufferPool(keep_bytes=2 * max_bytes)

    def _read(self, reader: CheckpointReader, key: str, start: int, stop: int, nbytes: int) -> torch.Tensor:
        if nbytes >= self.MAP_MIN_BYTES:
            mapped = reader.map_flat(key, start, stop)
            if mapped is not None:
                return mapped
        return reader.read_flat_into(key, start, stop, self._buffers.acquire(nbytes))

    def _fill(self) -> None:
        while not self._pending or self._in_flight < self._max_bytes:
            request = next(self._requests, None)
            if request is None:
                return
            nbytes = request[4]
            self._pending.append((nbytes, self._pool.submit(self._read, *request)))
            self._in_flight += nbytes

    def next(self) -> torch.Tensor:
        self._fill()
        nbytes, future = self._pending.popleft()
        self._in_flight -= nbytes
        tensor = future.result()
        self._fill()
        return tensor

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


class WriteBehind:
    """Appends output chunks on one background thread (in order), so combining the next chunk overlaps
    writing this one. At most ``max_bytes`` wait; a write error surfaces on the next ``put`` or ``flush``."""

    def __init__(self, max_bytes: int):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soupkit-write")
        self._pending: deque[tuple[int, Future[None]]] = deque()
        self._bytes = 0
        self._max_bytes = max_bytes

    def put(self, sink: CheckpointSink, key: str, chunk: torch.Tensor) -> None:
        nbytes = chunk.numel() * chunk.element_size()
        self._pending.append((nbytes, self._pool.submit(sink.write, key, chunk)))
        self._bytes += nbytes
        while self._pending and (self._bytes > self._max_bytes or self._pending[0][1].done()):
            done_bytes, future = self._pending.popleft()
            self._bytes -= done_bytes
            future.result()

    def flush(self) -> None:
        while self._pending:
            self._bytes -= self._pending[0][0]
            self._pending.popleft()[1].result()

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()


class InputSequence(Sequence[torch.Tensor]):
    """The inputs of one (chunk of a) tensor, as the method sees them: upcast on the compute device, read
    lazily in order. Iterating reads each input once and keeps none; indexing caches what it read."""

    def __init__(self, count: int, fetch: Callable[[], torch.Tensor]):
        self._count = count
        self._fetch = fetch
        self._cache: list[torch.Tensor] = []
        self._consumed = 0

    def __len__(self) -> int:
        return self._count

    def _advance(self) -> torch.Tensor:
        self._consumed += 1
        return self._fetch()

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._consumed > len(self._cache):
            raise RuntimeError("merge method iterated its inputs twice; index them instead")  # method bug
        yield from self._cache
        while self._consumed < self._count:
            yield self._advance()

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]  # type: ignore[return-value]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        while len(self._cache) <= index:
            self._cache.append(self._advance())
        return self._cache[index]

    def drain(self) -> None:
        """Read (and cache) every input not read yet, keeping the read schedule in step."""
        while self._consumed < self._count:
            self._cache.append(self._advance())


# --------------------------------------------------------------------------------------------- merging


def _spans(numel: int, step: int) -> Iterator[tuple[int, int]]:
    """Flat ``[start, stop)`` ranges covering ``numel`` elements (one empty range for an empty tensor)."""
    if numel == 0:
        yield 0, 0
        return
    for start in range(0, numel, step):
        yield start, min(start + step, numel)


def run_merge(
    method: MergeMethod,
    readers: Sequence[CheckpointReader],
    variants: Sequence[Variant],
    options: MergeOptions,
    base: CheckpointReader | None = None,
    keys: Sequence[str] | None = None,
) -> None:
    """Stream the merge of ``readers`` into every variant's sink (one read of the inputs for all variants)."""
    if keys is None:
        keys = check_compatible(readers, allow_missing=options.allow_missing, base=base)
    merged_keys = select_keys(keys, options.include, options.exclude)
    device = torch.device(options.device)
    acc_dtype = torch.float64 if options.precise else torch.float32
    # NaN/Inf: check each merged output instead of every input when the method's output carries them
    check_outputs = method.propagates_nonfinite and not options.allow_nonfinite
    check_inputs = not check_outputs
    holders = {k: [r for r in readers if k in r] for k in keys}
    infos = {k: holders[k][0].info(k) for k in keys}
    auxiliary = _open_auxiliary(method, variants, readers, infos)
    position = {id(r): i for i, r in enumerate(readers)}  # input index, for auxiliary per-input files

    def step_of(key: str) -> int:
        return max(1, options.chunk_elements) if method.elementwise else max(infos[key].numel, 1)

    def schedule() -> Iterator[tuple[CheckpointReader, str, int, int, int]]:
        for key in keys:
            info, sources = infos[key], holders[key]
            if not info.is_float or key not in merged_keys:
                # integer tensors: every input, to compare; unmerged float tensors: the first input only
                for reader in sources if not info.is_float else sources[:1]:
                    yield reader, key, 0, info.numel, reader.info(key).nbytes
                continue
            for start, stop in _spans(info.numel, step_of(key)):
                for reader in ([base] if base is not None else []) + sources:
                    yield reader, key, start, stop, (stop - start) * reader.info(key).dtype.itemsize

    reads = ReadAhead(schedule(), options.read_ahead_bytes)
    writes = WriteBehind(options.read_ahead_bytes)
    progress = _Progress(sum(r.info(k).nbytes for k in keys for r in holders[k]), options.progress)
    disagreements: list[str] = []
    # Chunked CPU merges run torch ops on one thread: a few-MB chunk gains nothing from intra-op threads, and
    # their spin-waiting between ops takes the cores the reader and writer threads need (~1 CPU-s per GB here)
    threads = torch.get_num_threads()
    single_thread = device.type == "cpu" and method.elementwise and threads > 1
    if single_thread:
        torch.set_num_threads(1)
    try:
        for key in keys:
            info, sources = infos[key], holders[key]
            if not info.is_float:
                first = reads.next()
                for reader in sources[1:]:
                    if not torch.equal(reads.next(), first) and key not in disagreements:
                        disagreements.append(key)
                        warnings.warn(f"{key!r}: integer tensor differs between {sources[0].name} and "
                                      f"{reader.name}; kept the first input's", SoupkitWarning, stacklevel=2)
                for variant in variants:
                    writes.put(variant.sink, key, first.reshape(-1))
                progress.advance(sum(r.info(key).nbytes for r in sources))
                continue
            if key not in merged_keys:
                tensor = reads.next()
                for variant in variants:
                    writes.put(variant.sink, key, tensor.to(variant.sink.dtype_of(key)))
                progress.advance(info.nbytes)
                continue
            for start, stop in _spans(info.numel, step_of(key)):
                shape = (stop - start,) if method.elementwise else info.shape
                base_chunk = None
                if base is not None:
                    base_chunk = _prepare(reads.next(), base, key, shape, device, acc_dtype, options)
                pending = iter(sources)

                def fetch() -> torch.Tensor:
                    reader = next(pending)  # noqa: B023 - used within this iteration only
                    return _prepare(reads.next(), reader, key, shape, device, acc_dtype, options,  # noqa: B023
                                    check=check_inputs)

                inputs = InputSequence(len(sources), fetch)
                if len(variants) > 1 or not method.elementwise:
                    inputs.drain()  # whole tensors, or several outputs: hold this chunk's inputs once
                kwargs: dict[str, Any] = {}
                if method.needs_base:
                    kwargs["base"] = base_chunk
                if method.takes_key:
                    kwargs["key"] = key
                    if method.elementwise:
                        kwargs["offset"] = start
                results = []
                for variant, files in zip(variants, auxiliary):
                    chunks = {name: [None if key not in r else
                                     _prepare(r.read_flat(key, start, stop), r, key, shape, device, acc_dtype, options)
                                     for r in (per_input[position[id(s)]] for s in sources)]
                              for name, per_input in files.items()}
                    results.append(method.fn(inputs, **{**variant.params, **chunks}, **kwargs))
                inputs.drain()  # inputs a method skipped (wise at alpha=0) keep the read order in step
                if check_outputs:
                    for result in results:
                        _check_output(result, sources, key, start, stop, method.name)
                for variant, result in zip(variants, results):
                    out = result.reshape(-1).to(device="cpu", dtype=variant.sink.dtype_of(key))
                    writes.put(variant.sink, key, out)
                progress.advance(sum(r.info(key).dtype.itemsize for r in sources) * (stop - start))
        writes.flush()
    finally:
        if single_thread:
            torch.set_num_threads(threads)
        writes.close()
        reads.close()
        progress.close()
        _close_all(auxiliary)
    options.stats["integer_disagreements"] = disagreements


def _open_auxiliary(method: MergeMethod, variants: Sequence[Variant], readers: Sequence[CheckpointReader],
                    infos: dict[str, TensorInfo]) -> list[dict[str, list[CheckpointReader]]]:
    """Open and check each variant's ``TensorFiles`` parameters (one reader per input): every tensor in them
    must be a floating tensor of the inputs, with the inputs' shape."""
    from soupkit.io import open_checkpoint

    opened: dict[str, CheckpointReader] = {}
    result: list[dict[str, list[CheckpointReader]]] = []
    try:
        for variant in variants:
            files: dict[str, list[CheckpointReader]] = {}
            for name, marker in auxiliary_parameters(method).items():
                paths = variant.params.get(name)
                if paths is None:
                    continue
                per_input: list[CheckpointReader] = []
                for path in paths:
                    if path not in opened:
                        opened[path] = reader = open_checkpoint(path)
                        _check_auxiliary(reader, marker, infos)
                    per_input.append(opened[path])
                files[name] = per_input
            result.append(files)
    except BaseException:
        for reader in opened.values():
            reader.close()
        raise
    return result


def _check_auxiliary(reader: CheckpointReader, marker: TensorFiles, infos: dict[str, TensorInfo]) -> None:
    for key, info in reader.infos().items():
        if key not in infos or not infos[key].is_float:
            raise IncompatibleCheckpointsError(
                f"{reader.name}: {marker.what} tensor {key!r} is not a floating tensor of the checkpoints being "
                f"merged.{suggest(key, infos)}"
            )
        if info.shape != infos[key].shape:
            raise IncompatibleCheckpointsError(
                f"{reader.name}: {marker.what} tensor {key!r} has shape {tuple(info.shape)}, the checkpoints "
                f"have {tuple(infos[key].shape)}"
            )
        if not info.is_float:
            raise IncompatibleCheckpointsError(f"{reader.name}: {marker.what} tensor {key!r} is not floating point")


def _close_all(auxiliary: Sequence[dict[str, list[CheckpointReader]]]) -> None:
    for reader in {id(r): r for files in auxiliary for rs in files.values() for r in rs}.values():
        reader.close()


def _prepare(raw: torch.Tensor, reader: CheckpointReader, key: str, shape: tuple[int, ...], device: torch.device,
             acc_dtype: torch.dtype, options: MergeOptions, *, check: bool = True) -> torch.Tensor:
    """Move one raw input chunk to the compute device in the accumulation dtype; reject NaN/Inf."""
    tensor = raw.to(device=device, non_blocking=True).to(acc_dtype).reshape(shape)
    if check and not options.allow_nonfinite and not _all_finite(tensor):
        raise NonFiniteError(
            f"{reader.name}: tensor {key!r} contains NaN or Inf (pass --allow-nonfinite to merge anyway)"
        )
    return tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    # A sum is ~50x cheaper than isfinite().all() and is NaN/Inf whenever an element is; only a huge finite
    # tensor whose sum overflows takes the exact (slow) check.
    return math.isfinite(tensor.sum()) or bool(torch.isfinite(tensor).all())


def _check_output(result: torch.Tensor, sources: Sequence[CheckpointReader], key: str, start: int, stop: int,
                  method: str) -> None:
    """For methods whose output is NaN/Inf whenever an input is: one check of the output stands for N input
    checks. On failure, re-read this chunk of each input to name the one at fault (the error path only)."""
    if _all_finite(result):
        return
    for reader in sources:
        if not _all_finite(reader.read_flat(key, start, stop).to(torch.float64)):
            raise NonFiniteError(
                f"{reader.name}: tensor {key!r} contains NaN or Inf (pass --allow-nonfinite to merge anyway)"
            )
    raise NonFiniteError(f"tensor {key!r}: the {method} of these finite inputs overflows to Inf "
                         f"(pass --precise to accumulate in float64)")


class _Progress:
    """A rich progress bar over input bytes (silent unless enabled)."""

    def __init__(self, total_bytes: int, enabled: bool):
        self._bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(TextColumn("merging"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                             TimeRemainingColumn(), transient=True)
        self._bar.start()
        self._task = self._bar.add_task("merge", total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def open_all(sources: Sequence[Any], opener: Callable[[Any, int], CheckpointReader]) -> list[CheckpointReader]:
    readers: list[CheckpointReader] = []
    try:
        for number, source in enumerate(sources):
            readers.append(opener(source, number))
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers


def describe_sources(sources: Sequence[Any]) -> list[str]:
    return [str(s) if isinstance(s, (str, Path)) else f"<state dict #{i}>" for i, s in enumerate(sources)]

