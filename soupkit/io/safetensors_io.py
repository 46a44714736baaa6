"""safetensors files: a validating lazy reader and a streaming writer.

Why not ``safetensors.safe_open`` for reading: it memory-maps the file, and every page a merge touches then
stays in the process's RSS until the file is closed, so a soup of N checkpoints shows N checkpoints of memory.
We parse the (tiny, JSON) header ourselves, validate every offset against the file size, and read each tensor
-- or a flat element range of it -- with one ``preadv`` into memory the tensor owns, or (``map_flat``, what the
merge engine streams through) map just that range and unmap it when the chunk is freed: no copy, and RSS stays
bounded by the chunks alive at once.

Why not ``safetensors.torch.save_file`` for writing: it needs every output tensor in memory at once. The
streaming writer lays out the header from the known output shapes first, then appends tensor bytes as the merge
produces them; the tests read its files back with the safetensors library itself.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import mmap
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from soupkit.errors import CheckpointError, OutputError
from soupkit.io.base import CheckpointReader, TensorInfo

#: safetensors dtype codes <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAGIC_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit on header size
_ALIGN = 8


def looks_like_safetensors(head: bytes) -> bool:
    """True if the first bytes are an 8-byte little-endian header length followed by '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < MAGIC_MAX_HEADER


def read_into(fd: int, buffer: torch.Tensor, offset: int, name: str) -> None:
    """Fill a uint8 CPU tensor from ``fd`` at ``offset`` (no memory map; loops over short reads)."""
    view = memoryview(buffer.numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{name}: file is truncated (wanted {len(view) - done} more bytes at offset "
                                  f"{offset + done})")
        done += n


#: Linux's MADV_POPULATE_READ (5.14+): fault a mapped range in, in bulk, without reading through it; fails with
#: EFAULT where an access would raise SIGBUS (the file shrank), so a bad range is never touched
_MADV_POPULATE_READ = 22
_mapping_works = sys.platform == "linux"
_madvise = None


def map_range(fd: int, offset: int, nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of ``fd`` from ``offset`` as a uint8 tensor over a private, prefaulted memory map, or None where
    that is not possible here (not Linux, kernel without MADV_POPULATE_READ, the range no longer in the file).
    Writes to the tensor stay private (copy-on-write); the map is released when the tensor is freed. As with any
    memory-mapped reader (``safe_open``, ``torch.load(mmap=True)``), another process truncating the file between
    the prefault here and the read would raise SIGBUS; a file already short is caught here (EFAULT)."""
    global _mapping_works, _madvise
    if not _mapping_works or nbytes == 0:
        return None
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)  # ctypes drops the GIL around the call: other threads run on
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise = libc.madvise
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        window = mmap.mmap(fd, offset + nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    anchor = ctypes.c_char.from_buffer(window)
    populated = _madvise(ctypes.addressof(anchor), len(window), _MADV_POPULATE_READ) == 0
    error = 0 if populated else ctypes.get_errno()
    del anchor
    if not populated:
        if error in (errno.EINVAL, errno.ENOSYS):
            _mapping_works = False  # old kernel: read() instead from now on
        window.close()
        return None
    return torch.from_numpy(np.frombuffer(window, dtype=np.uint8, count=nbytes, offset=offset - start))


class SafetensorsReader(CheckpointReader):
    """Lazy, validated reader for one ``.safetensors`` file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot open: {err.strerror}") from None
        try:
            self._size = os.fstat(self._fd).st_size
            self._entries, self._metadata, self._data_start = self._parse_header()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.name}: not a valid safetensors file: {what}")

    def _parse_header(self) -> tuple[dict[str, tuple[TensorInfo, int]], dict[str, str], int]:
        if self._size < 8:
            raise self._fail(f"only {self._size} bytes, too short for a header")
        (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if length > MAGIC_MAX_HEADER or 8 + length > self._size:
            raise self._fail(f"header length {length} exceeds the file size {self._size} (truncated header?)")
        raw = os.pread(self._fd, length, 8)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise self._fail("header is not valid JSON (truncated or corrupt)") from None
        except RecursionError:  # "[[[[...": valid JSON nested deeper than Python's stack
            raise self._fail("header JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._fail("__metadata__ must map strings to strings")
        data_start = 8 + length
        data_len = self._size - data_start
        entries: dict[str, tuple[TensorInfo, int]] = {}
        spans: list[tuple[int, int, str]] = []
        for key, entry in header.items():
            if not isinstance(entry, dict):
                raise self._fail(f"tensor {key!r}: entry is not an object")
            code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if code not in DTYPES:
                raise self._fail(f"tensor {key!r}: unknown dtype {code!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise self._fail(f"tensor {key!r}: bad shape {shape!r}")
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
                raise self._fail(f"tensor {key!r}: bad data_offsets {offsets!r}")
            info = TensorInfo(key, tuple(shape), DTYPES[code])
            begin, end = offsets
            if end - begin != info.nbytes:
                raise self._fail(
                    f"tensor {key!r}: {code} {tuple(shape)} needs {info.nbytes} bytes but data_offsets "
                    f"span {end - begin}"
                )
            if end > data_len:
                raise CheckpointError(
                    f"{self.name}: file is truncated: tensor {key!r} ends at byte {data_start + end} but the "
                    f"file has {self._size}"
                )
            entries[key] = (info, data_start + begin)
            spans.append((begin, end, key))
        spans.sort()
        for (_, end_a, key_a), (begin_b, _, key_b) in itertools.pairwise(spans):
            if begin_b < end_a:
                raise self._fail(f"tensors {key_a!r} and {key_b!r} overlap")
        # keep the writer's order (file order), which is the order users see in `inspect`
        ordered = sorted(entries, key=lambda k: entries[k][1])
        return {k: entries[k] for k in ordered}, dict(metadata), data_start

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, key: str) -> TensorInfo:
        return self._entries[key][0]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor:
        info, _ = self._entries[key]
        return self.read_flat(key, 0, info.numel).reshape(info.shape)

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        info = self._entries[key][0]
        return self.read_flat_into(key, start, stop, torch.empty((stop - start) * info.dtype.itemsize,
                                                                 dtype=torch.uint8))

    def read_flat_into(self, key: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        info, offset = self._entries[key]
        read_into(self._fd, buffer, offset + start * info.dtype.itemsize, self.name)
        return buffer.view(info.dtype)

    def map_flat(self, key: str, start: int, stop: int) -> torch.Tensor | None:
        info, offset = self._entries[key]
        offset += start * info.dtype.itemsize
        if offset % info.dtype.itemsize:
            return None  # unaligned data (a foreign writer's header padding): read into aligned memory instead
        raw = map_range(self._fd, offset, (stop - start) * info.dtype.itemsize)
        return None if raw is None else raw.view(info.dtype)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    @property
    def file_size(self) -> int:
        return self._size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Streams one safetensors file: header from the planned tensors first, then each tensor's bytes in order.

    ``write(key, chunk)`` may be called several times per key with consecutive flat chunks; the writer checks
    that exactly the planned number of bytes arrives for every tensor, in plan order.
    """

    def __init__(self, file: BinaryIO, plan: Iterable[TensorInfo], metadata: dict[str, str] | None, name: str):
        self._file = file
        self._name = name
        self._plan = list(plan)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for info in self._plan:
            if info.dtype not in CODES:
                raise OutputError(f"{name}: dtype {info.dtype} of tensor {info.key!r} cannot be stored in "
                                  f"safetensors")
            header[info.key] = {"dtype": CODES[info.dtype], "shape": list(info.shape),
                                "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % _ALIGN)  # tensor data starts 8-byte aligned, as the spec recommends
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._index = 0
        self._remaining = self._plan[0].nbytes if self._plan else 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._plan) and self._remaining == 0:
            self._index += 1
            if self._index < len(self._plan):
                self._remaining = self._plan[self._index].nbytes

    def write(self, key: str, chunk: torch.Tensor) -> None:
        if chunk.numel() == 0:
            return
        if self._index >= len(self._plan) or self._plan[self._index].key != key:
            expected = self._plan[self._index].key if self._index < len(self._plan) else "nothing"
            raise RuntimeError(f"writer got {key!r} but expected {expected!r}")  # engine bug, not user error
        data = tensor_bytes(chunk)
        if len(data) > self._remaining:
            raise RuntimeError(f"too many bytes for {key!r}")
        self._file.write(data)
        self._remaining -= len(data)
        if self._remaining == 0:
            self._index += 1
            if self._index < len(self._plan):
                self._remaining = self._plan[self._index].nbytes
            self._skip_empty()

    def finish(self) -> None:
        if self._index != len(self._plan):
            raise RuntimeError(f"{self._name}: tensor {self._plan[self._index].key!r} was not fully written")
