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

import bisect
import fnmatch
import math
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from soupkit import interrupt
from soupkit.errors import IncompatibleCheckpointsError, NonFiniteError, ParameterError, suggest
from soupkit.io import CheckpointReader, CheckpointSink, TensorInfo, open_checkpoint
from soupkit.merging.checks import call_method
from soupkit.merging.registry import MergeMethod, TensorFiles
from soupkit.options import OutputOptions, parse_dtype, resolve_device

#: default flat chunk for elementwise methods: 1M elements = 4 MB per fp32 operand, so a running mean's
#: accumulator stays in the CPU's cache while each input streams through it (measured fastest here vs 256K-16M)
DEFAULT_CHUNK_ELEMENTS = 1 << 20


class SoupkitWarning(UserWarning):
    """Something worth telling the user that does not stop the merge."""


@dataclass
class EngineRun:
    """One merge pass's settings: the user's ``OutputOptions`` resolved for torch, plus engine tuning."""

    options: OutputOptions = field(default_factory=OutputOptions)
    progress: bool = False
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    read_ahead_bytes: int = 32 << 20
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.options.dtype)
        self.device = resolve_device(self.options.device)
        self.acc_dtype = torch.float64 if self.options.precise else torch.float32


@dataclass(frozen=True)
class Variant:
    """One output of a merge pass: the method's bound parameters (or a function of the tensor name giving them,
    for per-layer parameters) and where the result goes."""

    params: dict[str, Any] | Callable[[str], dict[str, Any]]
    sink: CheckpointSink

    def params_for(self, key: str) -> dict[str, Any]:
        return self.params(key) if callable(self.params) else self.params


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
    infos = [r.infos() for r in readers]
    plan = []
    for key in keys:
        info = next(i[key] for i in infos if key in i)
        out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        plan.append(TensorInfo(key, info.shape, out_dtype))
    return plan


# --------------------------------------------------------------------------------------------- reading


class BufferPool:
    """Recycled read buffers. A buffer returns to the pool when the last tensor viewing it is freed, so pages
    stay resident and are reused instead of being faulted in afresh for every chunk, and memory stays bounded
    by what is actually alive (the read-ahead window plus the chunk being combined). Reads below
    ``MIN_POOLED`` bytes are plain allocations: with tens of thousands of small tensors, pooling them cost more
    than it saved (a profile of 4,000 keys spent half its time releasing buffers).

    A freed view is noticed by a weak reference whose callback is ``deque.append``, C code that runs no Python
    bytecode, so no signal handler can run (and no exception can be raised, then dropped) inside it; the slab is
    put back on the free list by the next ``acquire``."""

    MIN_POOLED = 64 << 10

    def __init__(self, keep_bytes: int):
        self._free: list[tuple[int, int, np.ndarray]] = []  # sorted by size: (nbytes, id, slab)
        self._free_bytes = 0
        self._keep_bytes = keep_bytes
        self._lock = threading.Lock()
        # id of a weak ref to a lent view -> (that ref, kept alive so its callback fires; the slab under the view)
        self._lent: dict[int, tuple[weakref.ref[np.ndarray], np.ndarray]] = {}
        self._returned: deque[weakref.ref[np.ndarray]] = deque()  # refs of views that died (appended from C)

    def acquire(self, nbytes: int) -> torch.Tensor:
        if nbytes < self.MIN_POOLED:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._take_back()
            index = bisect.bisect_left(self._free, (nbytes, -1))  # the smallest free slab that fits
            slab = self._free.pop(index)[2] if index < len(self._free) else None
            if slab is not None:
                self._free_bytes -= slab.nbytes
        if slab is None:
            slab = np.empty(nbytes, dtype=np.uint8)
        view = slab[:nbytes]
        with self._lock:
            ref = weakref.ref(view, self._returned.append)
            self._lent[id(ref)] = (ref, slab)
        return torch.from_numpy(view)

    def _take_back(self) -> None:
        """Move the slabs of views freed since the last call onto the free list (under the lock)."""
        while self._returned:
            _, slab = self._lent.pop(id(self._returned.popleft()))
            bisect.insort(self._free, (slab.nbytes, id(slab), slab))
            self._free_bytes += slab.nbytes
            while self._free_bytes > self._keep_bytes:
                self._free_bytes -= self._free.pop(0)[0]  # drop the smallest first


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
            if nbytes < BufferPool.MIN_POOLED:  # a thread hand-off costs more than reading a few KB here
                future: Future[torch.Tensor] = Future()
                future.set_result(self._read(*request))
            else:
                future = self._pool.submit(self._read, *request)
            self._pending.append((nbytes, future))
            self._in_flight += nbytes

    def take(self, count: int) -> list[Future[torch.Tensor]]:
        """The next ``count`` reads, in schedule order (a consumer takes exactly one step's reads at a time)."""
        taken = []
        for _ in range(count):
            self._fill()
            nbytes, future = self._pending.popleft()
            self._in_flight -= nbytes
            taken.append(future)
        self._fill()
        return taken

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
    """The inputs of one (chunk of a) tensor, as the method sees them: upcast on the compute device, each
    prepared on first use (iterating holds one at a time: a running mean never keeps all N)."""

    def __init__(self, reads: Sequence[Future[torch.Tensor]], prepare: Callable[[int, torch.Tensor], torch.Tensor],
                 keep: bool):
        self._reads = reads
        self._prepare = prepare
        self._cache: dict[int, torch.Tensor] = {}
        self._keep = keep  # several outputs, or whole tensors: prepare each input once for all of them

    def __len__(self) -> int:
        return len(self._reads)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self._reads)):
            yield self[index]

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]  # type: ignore[return-value]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index in self._cache:
            return self._cache[index]
        tensor = self._prepare(index, self._reads[index].result())
        if self._keep:
            self._cache[index] = tensor
        return tensor


# --------------------------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class Step:
    """One unit of the merge: a key, a flat range of it, and the reads it consumes, in order. The read schedule
    and the consumer both walk the same list of steps, so they cannot drift apart."""

    key: str
    kind: str  # "merge" (base first when there is one, then the holders), "copy" (first holder), "integer" (all)
    start: int
    stop: int
    reads: tuple[CheckpointReader, ...]
    sources: tuple[CheckpointReader, ...]  # the inputs holding the key


def _spans(numel: int, step: int) -> Iterator[tuple[int, int]]:
    """Flat ``[start, stop)`` ranges covering ``numel`` elements (one empty range for an empty tensor)."""
    if numel == 0:
        yield 0, 0
        return
    for start in range(0, numel, step):
        yield start, min(start + step, numel)


def plan_steps(method: MergeMethod, readers: Sequence[CheckpointReader], keys: Sequence[str],
               base: CheckpointReader | None, run: EngineRun) -> tuple[list[Step], dict[str, TensorInfo]]:
    """Every step of the merge, in order, with the tensor infos of the first holder of each key."""
    merged = select_keys(keys, run.options.include, run.options.exclude)
    reader_infos = [r.infos() for r in readers]
    steps: list[Step] = []
    infos: dict[str, TensorInfo] = {}
    for key in keys:
        sources = tuple(r for r, i in zip(readers, reader_infos) if key in i)
        info = infos[key] = next(i[key] for i in reader_infos if key in i)
        if not info.is_float:
            steps.append(Step(key, "integer", 0, info.numel, sources, sources))
        elif key not in merged or len(sources) < method.min_models:  # too few holders (allow_missing): copied
            steps.append(Step(key, "copy", 0, info.numel, sources[:1], sources))
        else:
            size = max(1, run.chunk_elements) if method.elementwise else max(info.numel, 1)
            reads = ((base,) if base is not None else ()) + sources
            steps += [Step(key, "merge", start, stop, reads, sources) for start, stop in _spans(info.numel, size)]
    return steps, infos


def _read_requests(steps: Sequence[Step]) -> Iterator[tuple[CheckpointReader, str, int, int, int]]:
    for step in steps:
        for reader in step.reads:
            itemsize = reader.info(step.key).dtype.itemsize
            yield reader, step.key, step.start, step.stop, (step.stop - step.start) * itemsize


@interrupt.cooperative()  # Ctrl-C / SIGTERM stop it between steps, never inside a finaliser
def run_merge(
    method: MergeMethod,
    readers: Sequence[CheckpointReader],
    variants: Sequence[Variant],
    run: EngineRun,
    base: CheckpointReader | None = None,
    keys: Sequence[str] | None = None,
) -> None:
    """Stream the merge of ``readers`` into every variant's sink (one read of the inputs for all variants)."""
    if keys is None:
        keys = check_compatible(readers, allow_missing=run.options.allow_missing, base=base)
    steps, infos = plan_steps(method, readers, keys, base, run)
    reads = ReadAhead(_read_requests(steps), run.read_ahead_bytes)
    writes = WriteBehind(run.read_ahead_bytes)
    progress = _Progress(sum(r.info(s.key).dtype.itemsize * (s.stop - s.start) for s in steps for r in s.sources
                             if s.kind != "copy" or r is s.sources[0]), run.progress)
    merger = _Merger(method, variants, run, infos, readers)
    # Chunked CPU merges run torch ops on one thread: a few-MB chunk gains nothing from intra-op threads, and
    # their spin-waiting between ops takes the cores the reader and writer need (~1 CPU-s per GB here)
    threads = torch.get_num_threads()
    single_thread = run.device.type == "cpu" and method.elementwise and threads > 1
    if single_thread:
        torch.set_num_threads(1)
    try:
        for step in steps:
            interrupt.check()  # a recorded Ctrl-C / SIGTERM stops the merge here, between two steps
            for sink, chunk in merger.step(step, reads.take(len(step.reads))):
                writes.put(sink, step.key, chunk)
            progress.advance(sum(r.info(step.key).dtype.itemsize for r in step.reads) * (step.stop - step.start))
        writes.flush()
        interrupt.check()
    finally:
        if single_thread:
            torch.set_num_threads(threads)
        writes.close()
        reads.close()
        progress.close()
        merger.close()
    run.stats["integer_disagreements"] = merger.disagreements


class _Merger:
    """Turns each step's reads into output chunks, one per variant."""

    def __init__(self, method: MergeMethod, variants: Sequence[Variant], run: EngineRun,
                 infos: dict[str, TensorInfo], readers: Sequence[CheckpointReader]):
        self.method, self.variants, self.run, self.infos = method, variants, run, infos
        self.auxiliary = _open_auxiliary(method, variants, readers, infos, add_prefix=run.options.add_prefix)
        self.position = {id(r): i for i, r in enumerate(readers)}  # input index, for per-input auxiliary files
        # NaN/Inf: when the method's output carries any input's, one check of the output stands for N inputs
        self.check_inputs = not (method.propagates_nonfinite or run.options.allow_nonfinite)
        self.disagreements: list[str] = []

    def step(self, step: Step, reads: Sequence[Future[torch.Tensor]]) -> Iterator[tuple[CheckpointSink, torch.Tensor]]:
        if step.kind == "integer":
            first = reads[0].result()
            for reader, other in zip(step.sources[1:], reads[1:]):
                if not torch.equal(other.result(), first) and step.key not in self.disagreements:
                    self.disagreements.append(step.key)
                    warnings.warn(f"{step.key!r}: integer tensor differs between {step.sources[0].name} and "
                                  f"{reader.name}; kept the first input's", SoupkitWarning, stacklevel=2)
            return ((v.sink, first.reshape(-1)) for v in self.variants)
        if step.kind == "copy":
            tensor = reads[0].result()
            return ((v.sink, tensor.to(v.sink.dtype_of(step.key))) for v in self.variants)
        return self._merge(step, reads)

    def _merge(self, step: Step, reads: Sequence[Future[torch.Tensor]]
               ) -> Iterator[tuple[CheckpointSink, torch.Tensor]]:

        method, key, run = self.method, step.key, self.run
        shape = (step.stop - step.start,) if method.elementwise else self.infos[key].shape
        offset = 1 if len(step.reads) > len(step.sources) else 0  # the base's read comes first

        def prepare(index: int, raw: torch.Tensor) -> torch.Tensor:
            return _prepare(raw, step.sources[index], key, shape, run, check=self.check_inputs)

        inputs = InputSequence(reads[offset:], prepare, keep=len(self.variants) > 1 or not method.elementwise)
        context: dict[str, Any] = {"key": key, "offset": step.start}
        if offset:
            context["base"] = _prepare(reads[0].result(), step.reads[0], key, shape, run)
        context = {name: value for name, value in context.items() if name in method.context}
        for variant, files in zip(self.variants, self.auxiliary):
            chunks = {name: [None if key not in r else _prepare(r.read_flat(key, step.start, step.stop), r, key,
                                                                   shape, run)
                             for r in (per_input[self.position[id(s)]] for s in step.sources)]
                      for name, per_input in files.items()}
            result = call_method(method, inputs, {**variant.params_for(key), **chunks}, context, key=key,
                                 shape=shape, allow_nonfinite=run.options.allow_nonfinite)  # checked: merging.checks
            if not run.options.allow_nonfinite:
                _check_output(result, step, method.name)
            yield variant.sink, result.reshape(-1).to(device="cpu", dtype=variant.sink.dtype_of(key))

    def close(self) -> None:
        _close_all(self.auxiliary)


def _open_auxiliary(method: MergeMethod, variants: Sequence[Variant], readers: Sequence[CheckpointReader],
                    infos: dict[str, TensorInfo], *, add_prefix: str | None = None
                    ) -> list[dict[str, list[CheckpointReader]]]:
    """Open and check each variant's ``TensorFiles`` parameters (one reader per input): every tensor in them
    must be a floating tensor of the inputs, with the inputs' shape. ``add_prefix`` renames them as the inputs
    are renamed (a Fisher file is keyed like the model it was computed on)."""
    opened: dict[str, CheckpointReader] = {}
    result: list[dict[str, list[CheckpointReader]]] = []
    try:
        for variant in variants:
            files: dict[str, list[CheckpointReader]] = {}
            for name, marker in method.auxiliary.items():
                paths = variant.params.get(name)
                if paths is None:
                    continue
                per_input: list[CheckpointReader] = []
                for path in paths:
                    if path not in opened:
                        opened[path] = reader = open_checkpoint(path, add_prefix=add_prefix)
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


def _prepare(raw: torch.Tensor, reader: CheckpointReader, key: str, shape: tuple[int, ...], run: EngineRun, *,
             check: bool = True) -> torch.Tensor:
    """Move one raw input chunk to the compute device in the accumulation dtype; reject NaN/Inf."""
    tensor = raw.to(device=run.device, non_blocking=True).to(run.acc_dtype).reshape(shape)
    if check and not run.options.allow_nonfinite and not _all_finite(tensor):
        raise NonFiniteError(
            f"{reader.name}: tensor {key!r} contains NaN or Inf (pass --allow-nonfinite to merge anyway)"
        )
    return tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    # A sum is ~50x cheaper than isfinite().all() and is NaN/Inf whenever an element is; only a huge finite
    # tensor whose sum overflows takes the exact (slow) check.
    return math.isfinite(tensor.sum()) or bool(torch.isfinite(tensor).all())


def _check_output(result: torch.Tensor, step: Step, method: str) -> None:
    """Every method's output is checked. A NaN/Inf there comes from an input (methods whose output carries any
    input's skip the input checks: re-read this chunk of each to name the one at fault, on the error path only)
    or from the arithmetic overflowing on finite inputs."""
    if _all_finite(result):
        return
    for reader in step.sources:
        if not _all_finite(reader.read_flat(step.key, step.start, step.stop).to(torch.float64)):
            raise NonFiniteError(
                f"{reader.name}: tensor {step.key!r} contains NaN or Inf (pass --allow-nonfinite to merge anyway)"
            )
    raise NonFiniteError(f"tensor {step.key!r}: the {method} of these finite inputs is not finite (it overflows; "
                         f"smaller parameters or --precise may help)")


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
