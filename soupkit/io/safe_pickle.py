"""A restricted unpickler for PyTorch checkpoints: it never imports or runs code named by the file.

Three layouts are read, detected by content:

- the ``torch.save`` zip format: ``<archive>/data.pkl`` plus one ``<archive>/data/<key>`` record per storage;
- the legacy ``torch.save`` stream (``_use_new_zipfile_serialization=False``): pickled magic number, protocol
  and sys_info, the main pickle, the list of storage keys, then each storage as an 8-byte element count and
  its raw little-endian bytes;
- a plain ``pickle.dump`` of an object holding tensors (WiSE-FT pickles a whole ``nn.Module``), where each
  storage pickles as ``torch.storage._load_from_bytes(b)`` with ``b`` a legacy ``torch.save`` blob. We parse
  ``b`` ourselves; ``torch.load`` is never called.

How it stays safe: ``find_class`` hands out only (1) our own rebuild functions, which turn tensors into
``LazyTensor`` records, (2) inert constants and wrappers that build builtin containers from data already
unpickled, and (3) for every other name an empty stand-in class. Creating an instance of a stand-in
(``NEWOBJ``, ``copyreg._reconstructor``) gives an ``Opaque`` record that remembers its arguments and
``BUILD`` state; *calling* one (``REDUCE``) is refused, because without importing the name we cannot tell
``os.system`` from a class, and calling is how a pickle runs code.

Before each pickle is unpickled, a pass over its opcodes (building nothing) refuses the few inputs that make
CPython's C unpickler allocate far more than the file holds, such as a memo index of 2**31.

How it stays lazy: no storage byte is read while unpickling. A zip record is located by its offset in the
file; a legacy storage by its position after the main pickle; a ``_load_from_bytes`` payload in a plain
pickle is skipped (the unpickler's buffer is left unfilled) and remembered by its file offset. A tensor is
read later with one ``os.preadv`` into memory it owns, so nothing stays mapped.
"""

from __future__ import annotations

import _compat_pickle
import functools
import math
import os
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from soupkit.errors import CheckpointError

__all__ = [
    "LazyFile", "LazyStorage", "LazyTensor", "Opaque", "SafeUnpickler", "StorageType", "flatten_module",
    "open_lazy",
]  # fmt: skip

#: ``torch.serialization``'s legacy-format constants
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
#: ``_load_from_bytes`` payloads at least this large are skipped while unpickling and read on demand. Pickle
#: frames are ~64 KiB, so a payload this large is always read straight from the file, never from a frame.
SKIP_THRESHOLD = 256 * 1024
_CHUNK = 8192  # read-ahead for the many tiny reads the unpickler makes on unframed (protocol 2) pickles
_MAX_BLOB_DEPTH = 2  # a _load_from_bytes blob may not nest another one
#: how far a memo index may run ahead of the number of memo writes so far (picklers number them 0, 1, 2, ...)
_MEMO_SLACK = 1024
#: a compressed zip record may claim at most this many bytes per compressed byte. Deflate cannot exceed 1032:1
#: (RFC 1951: 258 bytes per 2-bit code at best), so a bigger claim is a bzip2/lzma decompression bomb; torch
#: itself never compresses, so only re-zipped files have compressed records at all
MAX_INFLATION = 1032
_LENGTH_PREFIX = {  # pickletools' codes for length-prefixed arguments -> (struct format, prefix size)
    pickletools.TAKEN_FROM_ARGUMENT1: ("<B", 1), pickletools.TAKEN_FROM_ARGUMENT4: ("<i", 4),
    pickletools.TAKEN_FROM_ARGUMENT4U: ("<I", 4), pickletools.TAKEN_FROM_ARGUMENT8U: ("<Q", 8),
}  # fmt: skip

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}  # fmt: skip
_STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")
#: inert torch constants that pickles reference by name (dtypes, layouts, memory formats); read from the
#: module's namespace so that no lazy ``torch.__getattr__`` submodule import is triggered
_TORCH_CONSTANTS: dict[str, Any] = {
    name: value
    for name, value in vars(torch).items()
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) and not name.startswith("_")
}
_RENAMED_MODULES = {"torch.tensor": "torch._tensor"}
#: torch rebuild functions for tensor kinds we do not read; named in a precise error instead of "refusing"
_UNSUPPORTED_REBUILDS = {
    "_rebuild_qtensor": "quantized", "_rebuild_sparse_tensor": "sparse", "_rebuild_nested_tensor": "nested",
    "_rebuild_wrapper_subclass": "tensor-subclass", "_rebuild_meta_tensor_no_storage": "meta",
    "_rebuild_device_tensor_from_cpu_tensor": "device", "_rebuild_device_tensor_from_numpy": "device",
    "_rebuild_xla_tensor": "XLA", "_rebuild_mps_tensor": "MPS",
}  # fmt: skip


class _Problem(Exception):
    """Raised inside the unpickler; the loader turns it into one ``CheckpointError`` line naming the file.

    ``standalone`` messages are shown as they are; others are prefixed with "not a valid torch checkpoint".
    """

    def __init__(self, message: str, *, standalone: bool = False):
        super().__init__(message)
        self.standalone = standalone


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so a message stays on one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class _Refused(_Problem):
    def __init__(self, module: str, name: str):
        super().__init__(
            f"refusing to load: the pickle calls {_printable(module)}.{_printable(name)}, which could run code; "
            "soupkit never executes pickled code",
            standalone=True,
        )


# ---------------------------------------------------------------------------------------------------------------
# Byte sources: where a storage's bytes live


class _FileHandle:
    """One open file descriptor shared by every storage of a checkpoint."""

    def __init__(self, path: Path):
        self.name = str(path)
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot open: {err.strerror}") from None
        self.size = os.fstat(self.fd).st_size

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` from ``offset`` with one ``preadv`` (looping only on short reads)."""
        if self.fd is None:
            raise CheckpointError(f"{self.name}: the checkpoint was closed; reopen it to read tensors")
        done = 0
        while done < len(out):
            try:
                n = os.preadv(self.fd, [out[done:]], offset + done)
            except OSError as err:
                raise CheckpointError(f"{self.name}: cannot read: {err.strerror}") from None
            if n == 0:
                raise CheckpointError(
                    f"{self.name}: file is truncated (wanted {len(out) - done} more bytes at offset {offset + done})"
                )
            done += n

    def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer at the end of the file)."""
        n = max(0, min(n, self.size - offset))
        buffer = bytearray(n)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Span:
    """``length`` bytes: the first ``len(prefix)`` held in memory, the rest in the file from ``start``.

    A whole file is ``_Span(handle, 0, size)``; a small in-memory blob is ``_Span(None, 0, len(b), b)``; a
    skipped ``_load_from_bytes`` payload keeps in ``prefix`` what the unpickler had already buffered of it.
    """

    def __init__(self, handle: _FileHandle | None, start: int, length: int, prefix: bytes = b""):
        self.handle, self._start, self.length, self.prefix = handle, start, length, prefix

    @property
    def start(self) -> int:
        return self._start

    def read_into(self, offset: int, out: memoryview) -> None:
        held = max(0, min(len(out), len(self.prefix) - offset))
        if held:
            out[:held] = self.prefix[offset : offset + held]
        if held < len(out):
            if self.handle is None:
                raise _Problem("a storage reaches past its data")
            self.handle.read_into(self.start + offset + held, out[held:])

    def pread(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.length - offset))
        if offset + n <= len(self.prefix):
            return self.prefix[offset : offset + n]
        buffer = bytearray(n)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)


class _ZipStoredRecord(_Span):
    """An uncompressed zip record: its data offset is found from its local header (30 bytes + name + extra)."""

    def __init__(self, handle: _FileHandle, header_offset: int, length: int, record: str):
        super().__init__(handle, -1, length)
        self._header_offset, self._record = header_offset, record

    @property
    def start(self) -> int:
        if self._start < 0:
            assert self.handle is not None
            header = self.handle.pread(self._header_offset, 30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.handle.name}: corrupt zip archive: bad local header for {self._record}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = self._header_offset + 30 + name_len + extra_len
            if start + self.length > self.handle.size:
                raise CheckpointError(f"{self.handle.name}: file is truncated: record {self._record} ends past "
                                      f"the end of the file")
            self._start = start
        return self._start


class _ZipCompressedRecord(_Span):
    """A compressed zip record (torch never writes one, but a re-zipped file may): read through ``zipfile``.

    Reading is sequential where the caller is (the merge engine reads a tensor's chunks in order): the inflating
    stream stays open between reads and only moves forward, so a record read in n chunks is inflated once, not
    n times from its start (quadratic work on a large record). It is closed once its last byte has been read.
    """

    def __init__(self, handle: _FileHandle, archive: Callable[[], zipfile.ZipFile], length: int, record: str):
        super().__init__(handle, 0, length)
        self._archive, self._record = archive, record
        self._member: Any = None
        self._at = 0

    def read_into(self, offset: int, out: memoryview) -> None:
        try:
            if self._member is None or offset < self._at:
                self._close_member()
                self._member, self._at = self._archive().open(self._record), 0
            if offset > self._at:
                self._member.seek(offset)  # forward: inflates and discards, in zipfile's bounded chunks
            data = self._member.read(len(out))
            self._at = offset + len(data)
        except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as err:
            self._close_member()
            raise CheckpointError(f"{self.handle.name if self.handle else '?'}: cannot read zip record "
                                  f"{self._record}: {err}") from None
        if self._at >= self.length:
            self._close_member()
        if len(data) != len(out):
            raise CheckpointError(f"{self.handle.name if self.handle else '?'}: zip record {self._record} is short")
        out[:] = data

    def _close_member(self) -> None:
        if self._member is not None:
            self._member.close()
            self._member = None


# ---------------------------------------------------------------------------------------------------------------
# Lazy storages and tensors


class LazyStorage:
    """``nbytes`` bytes of one storage, read on demand (``read_bytes`` is one ``os.pread``)."""

    __slots__ = ("_offset", "_source", "_swap", "dtype", "name", "nbytes")

    def __init__(self, source: _Span, offset: int, nbytes: int, dtype: torch.dtype, *, name: str,
                 swap: bool = False):
        self._source, self._offset, self.nbytes, self.dtype, self._swap = source, offset, nbytes, dtype, swap
        self.name = name  # the file, for messages

    def view(self, offset: int, nbytes: int, dtype: torch.dtype) -> LazyStorage:
        """A sub-range of this storage (legacy-format storage views)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise _Problem(f"a storage view [{offset}, {offset + nbytes}) reaches past its storage of "
                           f"{self.nbytes} bytes")
        return LazyStorage(self._source, self._offset + offset, nbytes, dtype, name=self.name, swap=self._swap)

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[offset, offset + len(out))`` of the storage."""
        if offset < 0 or offset + len(out) > self.nbytes:
            raise CheckpointError(f"{self.name}: read [{offset}, {offset + len(out)}) past a storage of "
                                  f"{self.nbytes} bytes")
        try:
            self._source.read_into(self._offset + offset, out)
        except _Problem as err:
            raise CheckpointError(f"{self.name}: {err}") from None

    def read_bytes(self, offset: int, n: int) -> bytes:
        """Bytes ``[offset, offset + n)`` of the storage, as stored (byte order not converted)."""
        buffer = bytearray(n)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def __setstate__(self, state: object) -> None:
        raise _Problem("a pickle tried to set the state of a storage")

    def __repr__(self) -> str:
        return f"LazyStorage({self.nbytes} bytes, {self.dtype})"


def _byteswap(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reverse the bytes of each element of a uint8 buffer (complex numbers: of each half)."""
    unit = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
    if unit <= 1:
        return raw
    return raw.view(-1, unit).flip(-1).reshape(-1).contiguous()


class LazyTensor:
    """A tensor's metadata plus its storage; ``materialize()`` reads it."""

    __slots__ = ("_conj", "_neg", "dtype", "shape", "storage", "storage_offset", "stride")

    def __init__(self, storage: LazyStorage, storage_offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                 dtype: torch.dtype, *, conj: bool = False, neg: bool = False):
        self.storage, self.storage_offset, self.shape, self.stride, self.dtype = (
            storage, storage_offset, shape, stride, dtype
        )
        self._conj, self._neg = conj, neg
        if math.prod(size for size in shape if size) >= 2**62:
            raise _Problem(f"a tensor of shape {list(shape)} is impossibly large")
        if self.numel:
            extent = storage_offset + sum((size - 1) * step for size, step in zip(shape, stride)) + 1
            available = storage.nbytes // dtype.itemsize
            if extent > available:
                raise _Problem(f"a tensor of shape {list(shape)} (stride {list(stride)}, offset {storage_offset}) "
                               f"needs {extent} elements but its storage holds {available}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, step in zip(reversed(self.shape), reversed(self.stride)):
            if size == 0:
                return True
            if size != 1 and step != expected:
                return False
            expected *= size
        return True

    def _read_elements(self, start: int, count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of the storage as a 1-D tensor owning its memory."""
        itemsize = self.dtype.itemsize
        raw = torch.empty(count * itemsize, dtype=torch.uint8)
        if count:
            self.storage.read_into(start * itemsize, memoryview(raw.numpy()))
        if self.storage._swap:
            raw = _byteswap(raw, self.dtype)
        return raw.view(self.dtype)

    def _finish(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._conj:
            tensor = tensor.conj_physical()
        if self._neg:
            tensor = tensor.neg()
        return tensor

    def materialize(self) -> torch.Tensor:
        """The whole tensor, contiguous, on the CPU, owning its memory."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        if self.is_contiguous():
            return self._finish(self._read_elements(self.storage_offset, self.numel).view(self.shape))
        span = sum((size - 1) * step for size, step in zip(self.shape, self.stride)) + 1
        flat = self._read_elements(self.storage_offset, span)
        strided = flat.as_strided(self.shape, self.stride, 0)
        return self._finish(strided.clone(memory_format=torch.contiguous_format))

    def read_flat(self, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the row-major flattened tensor (slice semantics), 1-D."""
        span = range(self.numel)[start:stop]
        if self.is_contiguous() and not (self._conj or self._neg):
            return self._read_elements(self.storage_offset + span.start, len(span))
        return self.materialize().reshape(-1)[span.start : span.stop].clone()

    def __setstate__(self, state: object) -> None:
        raise _Problem("a pickle tried to set the state of a tensor")

    def __repr__(self) -> str:
        return f"LazyTensor(shape={list(self.shape)}, dtype={self.dtype})"


# ---------------------------------------------------------------------------------------------------------------
# Stand-ins for everything the unpickler does not trust


class StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: just the dtype."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def __setstate__(self, state: object) -> None:
        raise _Problem(f"a pickle tried to set the state of {self.name}")

    def __repr__(self) -> str:
        return f"StorageType({self.name})"


class _SafeCallable:
    """A global the unpickler may call: a wrapper around our own code, never the object the pickle names."""

    __slots__ = ("function", "qualname", "rebuilds_tensor")

    def __init__(self, qualname: str, function: Callable[..., Any], rebuilds_tensor: bool = False):
        self.qualname, self.function, self.rebuilds_tensor = qualname, function, rebuilds_tensor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __setstate__(self, state: object) -> None:
        raise _Problem(f"a pickle tried to set the state of {self.qualname}")

    def __repr__(self) -> str:
        return f"<allowed {self.qualname}>"


#: modules whose callables reach the system, import or run code, or unpickle again. A pickle that *calls* one is
#: refused with the name shown (it is hostile or broken); a mere reference to one (a pickled function object)
#: stays an inert stand-in. No call is ever made either way: this list makes refusals explicit, it is not
#: what keeps soupkit safe.
_CALLS_OUT = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "builtins", "__builtin__",
    "runpy", "importlib", "imp", "pkgutil", "zipimport", "shutil", "socket", "ssl", "pty", "pickle", "_pickle",
    "marshal", "shelve", "dbm", "ctypes", "_ctypes", "code", "codeop", "compileall", "py_compile", "multiprocessing",
    "concurrent", "threading", "_thread", "asyncio", "signal", "resource", "fcntl", "mmap", "select", "webbrowser",
    "torch", "operator", "_operator", "copyreg", "gc", "inspect", "platform", "sysconfig", "site",
    "distutils", "setuptools", "pip", "venv", "ensurepip", "pydoc", "pdb", "bdb", "trace", "timeit", "profile",
    "cProfile", "atexit", "io", "_io", "tempfile", "glob", "fileinput", "linecache", "tarfile", "zipfile",
    "sqlite3", "urllib", "http", "ftplib", "smtplib", "telnetlib", "xmlrpc", "socketserver",
    "cloudpickle", "dill", "joblib", "yaml", "numpy.ctypeslib", "numpy.f2py", "numpy.testing", "numpy.distutils",
    "numpy.lib.npyio", "numpy.lib.format",
})  # fmt: skip
#: names in those modules that data pickles call: typing generics (``Dict[str, Any]``) reduce to operator.getitem
_CALLS_IN = frozenset({"operator.getitem", "_operator.getitem"})
_CALLS_OUT_NAMES = frozenset({"functools.reduce", "numpy.load", "numpy.fromfile", "numpy.loadtxt",
                              "numpy.genfromtxt", "numpy.memmap"})


def _calls_out(module: str, qualname: str) -> bool:
    """True if calling ``module.qualname`` would reach the system or run code (see ``_CALLS_OUT``)."""
    if f"{module}.{qualname}" in _CALLS_OUT_NAMES:
        return True
    if f"{module}.{qualname}" in _CALLS_IN:
        return False
    return any(module == name or module.startswith(name + ".") for name in _CALLS_OUT)


class _StandInMeta(type):
    """Metaclass of stand-in classes: instances may be created (inert), but calling the class is refused."""

    _sk_module: str
    _sk_qualname: str

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if _calls_out(cls._sk_module, cls._sk_qualname):
            raise _Refused(cls._sk_module, cls._sk_qualname)
        # any other name (an Enum member, functools.partial, Decimal, re._compile in Lightning hparams): the
        # call is recorded, never made, exactly like NEWOBJ; the result is inert data off the tensors' path
        instance = cls.__new__(cls, *args, **kwargs)
        instance.called = True
        return instance


class Opaque(metaclass=_StandInMeta):
    """An inert record of an object of a class soupkit does not import.

    ``args``/``kwargs`` are what its ``__new__`` received, ``state`` what ``BUILD`` gave (for an ``nn.Module``:
    its ``__dict__``), ``dictitems``/``listitems`` what ``SETITEMS``/``APPENDS`` added (dict/list subclasses).
    """

    _sk_module: ClassVar[str] = "soupkit"
    _sk_qualname: ClassVar[str] = "Opaque"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.called = False  # True: the pickle called the class (REDUCE), which was recorded, not made
        self.dictitems: dict[Any, Any] = {}
        self.listitems: list[Any] = []
        return self

    @property
    def module(self) -> str:
        return type(self)._sk_module

    @property
    def qualname(self) -> str:
        return type(self)._sk_qualname

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dictitems[key] = value

    def append(self, value: Any) -> None:
        self.listitems.append(value)

    def extend(self, values: Any) -> None:
        self.listitems.extend(values)

    def add(self, value: Any) -> None:
        self.listitems.append(value)

    def __repr__(self) -> str:
        return f"<opaque {self.module}.{self.qualname}>"


def _standin_class(module: str, name: str) -> type[Opaque]:
    return _StandInMeta(name.rpartition(".")[2], (Opaque,), {"_sk_module": module, "_sk_qualname": name})


def _record_call(cls: type[Opaque]) -> Callable[..., Opaque]:
    """For well-known data types whose pickles call them (numpy scalars, datetimes, paths): record the call
    as an ``Opaque`` without making it."""

    def record(*args: Any, **kwargs: Any) -> Opaque:
        return cls.__new__(cls, *args, **kwargs)

    return record


#: calls recorded rather than refused: data types whose reduce calls them, never anything that acts
_INERT_CALLS = {
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct", "numpy.dtype", "datetime.datetime", "datetime.date", "datetime.time",
    "datetime.timedelta", "datetime.timezone", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
    "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "pathlib._local.Path", "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath", "pathlib._local.PurePosixPath", "pathlib._local.PureWindowsPath",
    "collections.defaultdict", "collections.deque",
    "collections.Counter",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Allowlisted globals


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < 2**62:
        raise _Problem(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise _Problem(f"{what} must be a tuple of integers, got a {type(value).__name__}")
    return tuple(_int(v, what) for v in value)


def _storage(value: Any) -> LazyStorage:
    if not isinstance(value, LazyStorage):
        raise _Problem(f"a tensor's storage is of type {type(value).__name__}, not a storage")
    return value


@functools.cache
def _negatable(dtype: torch.dtype) -> bool:
    """Whether torch can negate ``dtype`` (not bool, uint16/32/64 or the float8s, as of torch 2.x): a 'neg' view
    of such a tensor can be saved but never read back."""
    try:
        torch.zeros(1, dtype=dtype).neg()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def _lazy_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: torch.dtype | None,
                 metadata: Any) -> LazyTensor:
    storage = _storage(storage)
    shape, steps = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if len(shape) != len(steps):
        raise _Problem(f"a tensor's size {list(shape)} and stride {list(steps)} differ in length")
    flags = metadata if isinstance(metadata, Mapping) else {}
    dtype = dtype or storage.dtype
    neg = bool(flags.get("neg"))
    if neg and not _negatable(dtype):
        raise _Problem(f"a {str(dtype).replace('torch.', '')} tensor carries the 'neg' flag, but torch cannot "
                       f"negate {str(dtype).replace('torch.', '')} tensors; save it with .resolve_neg() applied")
    return LazyTensor(storage, _int(storage_offset, "a storage offset"), shape, steps, dtype,
                      conj=bool(flags.get("conj")), neg=neg)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> LazyTensor:
    return _lazy_tensor(storage, storage_offset, size, stride, None, None)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> LazyTensor:
    return _lazy_tensor(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> LazyTensor:
    if not isinstance(dtype, torch.dtype):
        raise _Problem(f"a tensor's dtype is {dtype!r}")
    return _lazy_tensor(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None,
                       state: Any = None) -> LazyTensor:
    if not isinstance(data, LazyTensor):
        raise _Problem(f"a parameter's data is of type {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> LazyTensor:
    # a tensor subclass or a tensor with Python attributes: we keep the plain tensor and drop both
    if not (isinstance(func, _SafeCallable) and func.rebuilds_tensor and isinstance(args, tuple)):
        raise _Problem(f"_rebuild_from_type_v2 with {func!r} is not a tensor rebuild")
    return func(*args)


def _torch_size(sizes: Any = ()) -> tuple[int, ...]:
    return _ints(sizes, "torch.Size")


def _torch_device(kind: Any, index: Any = None) -> torch.device | str:
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise _Problem(f"torch.device({kind!r}, {index!r}) is not a device")
    try:
        return torch.device(kind) if index is None else torch.device(kind, index)
    except (RuntimeError, ValueError):
        return kind if index is None else f"{kind}:{index}"


def _get_layout(name: Any) -> torch.layout:
    """``torch.serialization._get_layout("torch.sparse_coo")``: a constant looked up by name."""
    layout = _TORCH_CONSTANTS.get(name.removeprefix("torch.")) if isinstance(name, str) else None
    if not isinstance(layout, torch.layout):
        raise _Problem(f"unknown tensor layout {name!r}")
    return layout


def _to_bytes(kind: type) -> Callable[..., bytes | bytearray]:
    def build(source: Any = b"", encoding: Any = None) -> bytes | bytearray:
        # protocol 2 pickles bytes as (str, 'latin1'); never bytes(n), which would allocate n bytes
        if isinstance(source, str) and encoding in ("latin1", "latin-1"):
            return kind(source.encode("latin-1"))
        if isinstance(source, (bytes, bytearray)) and encoding is None:
            return kind(source)
        raise _Problem(f"{kind.__name__}() with a {type(source).__name__} argument is not data")

    return build


def _codecs_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if isinstance(text, str) and encoding in ("latin1", "latin-1") and errors == "strict":
        return text.encode("latin-1")
    raise _Problem(f"_codecs.encode with encoding {encoding!r} is not the latin-1 bytes encoding")


def _new_instance(cls: Any, *args: Any, **kwargs: Any) -> Any:
    """``copyreg.__newobj__``: like the NEWOBJ opcode, for stand-in classes only."""
    if isinstance(cls, _StandInMeta):
        return cls.__new__(cls, *args, **kwargs)
    raise _Problem(f"cannot create an instance of {cls!r}")


def _new_instance_ex(cls: Any, args: Any, kwargs: Any) -> Any:
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise _Problem("copyreg.__newobj_ex__ needs a tuple and a dict")
    return _new_instance(cls, *args, **kwargs)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects): an inert instance, never ``base.__init__``."""
    if isinstance(cls, _StandInMeta):
        instance = cls.__new__(cls, base, state)
        if isinstance(state, dict):
            instance.dictitems.update(state)
        elif isinstance(state, list):
            instance.listitems.extend(state)
        return instance
    if isinstance(cls, _SafeCallable) and cls.qualname in _CONTAINERS:
        return cls() if state is None else cls(state)
    raise _Problem(f"cannot reconstruct an instance of {cls!r}")


#: data the container builtins may be built from: values the pickle already holds, never a lazy iterable
#: (``frozenset(range(10**15))`` would exhaust memory without any code being imported)
_MATERIALIZED = (list, tuple, dict, set, frozenset, OrderedDict)
_CONTAINERS: dict[str, type] = {
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.list": list, "builtins.tuple": tuple,
    "builtins.dict": dict, "collections.OrderedDict": OrderedDict,
}  # fmt: skip


def _container(qualname: str, kind: type) -> _SafeCallable:
    def build(items: Any = ()) -> Any:
        if not isinstance(items, _MATERIALIZED):
            raise _Problem(f"{qualname}() of a {type(items).__name__}")
        return kind(items)

    return _SafeCallable(qualname, build)


def _scalar(qualname: str, kind: type) -> _SafeCallable:
    """``complex``, ``slice``, ``range``: built from numbers (or strings), never from other objects."""

    def build(*args: Any) -> Any:
        if not all(arg is None or type(arg) in (int, float, str) for arg in args):
            raise _Problem(f"{qualname}() of {[type(arg).__name__ for arg in args]}")
        return kind(*args)

    return _SafeCallable(qualname, build)


#: allowlisted globals; each is a wrapper, so NEWOBJ/BUILD on them fail instead of reaching a real type
_SAFE_GLOBALS: dict[str, Any] = {
    **{qualname: _container(qualname, kind) for qualname, kind in _CONTAINERS.items()},
    **{f"builtins.{t.__name__}": _scalar(f"builtins.{t.__name__}", t) for t in (complex, slice, range)},
    "builtins.bytearray": _SafeCallable("builtins.bytearray", _to_bytes(bytearray)),
    "builtins.bytes": _SafeCallable("builtins.bytes", _to_bytes(bytes)),
    "_codecs.encode": _SafeCallable("_codecs.encode", _codecs_encode),
    "copyreg._reconstructor": _SafeCallable("copyreg._reconstructor", _reconstructor),
    "copyreg.__newobj__": _SafeCallable("copyreg.__newobj__", _new_instance),
    "copyreg.__newobj_ex__": _SafeCallable("copyreg.__newobj_ex__", _new_instance_ex),
    "torch.Size": _SafeCallable("torch.Size", _torch_size),
    "torch.device": _SafeCallable("torch.device", _torch_device),
    "torch.serialization._get_layout": _SafeCallable("torch.serialization._get_layout", _get_layout),
    "torch.nn.parameter.Parameter": _SafeCallable("torch.nn.parameter.Parameter", _rebuild_parameter),
    "torch._utils._rebuild_parameter": _SafeCallable("torch._utils._rebuild_parameter", _rebuild_parameter),
    "torch._utils._rebuild_parameter_with_state": _SafeCallable(
        "torch._utils._rebuild_parameter_with_state", _rebuild_parameter
    ),
    "torch._tensor._rebuild_from_type_v2": _SafeCallable("torch._tensor._rebuild_from_type_v2", _rebuild_from_type),
    **{
        f"torch._utils.{f.__name__}": _SafeCallable(f"torch._utils.{f.__name__}", f, rebuilds_tensor=True)
        for f in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3)
    },
}  # fmt: skip


def _check_inflation(info: zipfile.ZipInfo) -> None:
    """Refuse a compressed record that claims more bytes than its compressed size can justify."""
    if info.file_size > MAX_INFLATION * max(info.compress_size, 1):
        raise _Problem(f"zip record {info.filename} claims {info.file_size:,} bytes from {info.compress_size:,} "
                       f"compressed (more than {MAX_INFLATION}:1): refusing a decompression bomb", standalone=True)


def _unsupported(kind: str, qualname: str) -> _SafeCallable:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise _Problem(f"holds a {kind} tensor ({qualname}), which soupkit cannot read; save dense tensors",
                       standalone=True)

    return _SafeCallable(qualname, fail)


# ---------------------------------------------------------------------------------------------------------------
# The unpickler


def _address(buffer: Any) -> int:
    """Where a buffer's bytes start in memory (read through numpy's array interface, without ctypes)."""
    return int(np.frombuffer(buffer, dtype=np.uint8).__array_interface__["data"][0])


class _Stream:
    """A file object over a ``_Span`` for ``pickle.Unpickler``: exact positions, no memory map.

    With ``skip_large``, ``readinto`` of a big payload (a ``_load_from_bytes`` blob) reads nothing and leaves
    the unpickler's buffer untouched (so those pages never become resident); the skipped region is remembered
    by the buffer's end address, which is also the end of the resulting ``bytes``.
    """

    def __init__(self, span: _Span, position: int = 0, skip_large: bool = False):
        self.span, self.position, self.skip_large = span, position, skip_large
        self.skipped: dict[int, tuple[int, int]] = {}  # end address of the buffer -> (file offset, length)
        self._ahead, self._ahead_at = b"", 0

    def _take(self, n: int) -> bytes:
        at = self.position - self._ahead_at
        if at < 0 or at + n > len(self._ahead):
            if n > _CHUNK:
                data = self.span.pread(self.position, n)
                self.position += len(data)
                return data
            self._ahead, self._ahead_at, at = self.span.pread(self.position, _CHUNK), self.position, 0
        data = self._ahead[at : at + n]
        self.position += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.span.length - self.position
        return self._take(n)

    def readline(self) -> bytes:
        parts = []
        while True:
            chunk = self._take(min(_CHUNK, max(0, self.span.length - self.position)))
            if not chunk:
                break
            cut = chunk.find(b"\n")
            if cut >= 0:
                self.position -= len(chunk) - cut - 1
                parts.append(chunk[: cut + 1])
                break
            parts.append(chunk)
        return b"".join(parts)

    def peek(self, n: int = 1) -> bytes:
        """Up to ``_CHUNK`` bytes ahead, without moving: the C unpickler then buffers by itself and later
        calls ``read(consumed)``, which keeps ``position`` exact (what torch relies on with real files)."""
        at = self.position - self._ahead_at
        if at < 0 or at >= len(self._ahead):
            self._ahead, self._ahead_at, at = self.span.pread(self.position, _CHUNK), self.position, 0
        return self._ahead[at : at + _CHUNK]

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = len(view)
        if not (self.skip_large and n >= SKIP_THRESHOLD):
            data = self._take(n)
            view[: len(data)] = data
            return len(data)
        if self.position + n > self.span.length:
            return 0  # the unpickler reports the truncation
        end_address = _address(view) + n
        self.skipped[end_address] = (self.position, n)
        self.position += n
        return n


# what the opcode pre-pass does per opcode byte
_PLAIN, _INDEX_ARG, _PUT_LINE, _MEMOIZE, _STOP, _LINES2 = range(6)


def _opcode_table() -> list[tuple[int, int] | None]:
    """Per opcode byte: (pickletools' argument-size code n, action), or None for bytes that are no opcode."""
    actions = {"BINPUT": _INDEX_ARG, "LONG_BINPUT": _INDEX_ARG, "PUT": _PUT_LINE, "MEMOIZE": _MEMOIZE,
               "STOP": _STOP, "GLOBAL": _LINES2, "INST": _LINES2}  # fmt: skip
    table: list[tuple[int, int] | None] = [None] * 256
    for op in pickletools.opcodes:
        table[ord(op.code)] = (op.arg.n if op.arg is not None else 0, actions.get(op.name, _PLAIN))
    return table


_OPCODE_TABLE = _opcode_table()


def _line_end(span: _Span, position: int) -> int | None:
    """Offset of the first newline at or after ``position``, however far; None if there is none."""
    while True:
        chunk = span.pread(position, 65536)
        if not chunk:
            return None
        cut = chunk.find(b"\n")
        if cut >= 0:
            return position + cut
        position += len(chunk)


def _check_opcodes(span: _Span, position: int) -> None:
    """Walk the opcodes of the pickle at ``position`` without building anything, and refuse what would make
    the C unpickler allocate far more than the file holds: a memo index far ahead of the memo writes so far
    (CPython resizes its memo array to the index at once: 5 bytes of file, gigabytes of memory) or a payload
    longer than the data left. Payloads are skipped, not read. Anything else malformed is left for the
    unpickler itself to report."""
    window, base, puts, reach = b"", position, 0, 256
    while True:
        at = position - base
        if at + 9 > len(window):  # room for an opcode and its longest fixed or length-prefix argument
            # windows grow while the pickle goes on, so a tiny pickle does not read the tensor data after it
            window, base, at, reach = span.pread(position, reach), position, 0, min(2 * reach, 65536)
            if not window:
                return
        entry = _OPCODE_TABLE[window[at]]
        if entry is None:
            return
        n, action = entry
        index = None
        if n > 0:
            if at + 1 + n > len(window):
                return
            if action == _INDEX_ARG:
                index = int.from_bytes(window[at + 1 : at + 1 + n], "little")
            position += 1 + n
        elif n == pickletools.UP_TO_NEWLINE:
            position += 1
            for _ in range(2 if action == _LINES2 else 1):
                cut = window.find(b"\n", position - base)
                end = base + cut if cut >= 0 else _line_end(span, position)
                if end is None:
                    return
                if action == _PUT_LINE:
                    try:  # what the unpickler accepts: sign, spaces, underscores
                        index = int(span.pread(position, end - position))
                    except ValueError:
                        index = None
                position = end + 1
        elif n < 0:
            fmt, size = _LENGTH_PREFIX[n]
            raw = window[at + 1 : at + 1 + size]
            if len(raw) < size:
                return
            (length,) = struct.unpack(fmt, raw)
            position += 1 + size
            if length < 0:
                return
            if position + length > span.length:
                # no numbers from the file in the message: it may be a foreign file read as a pickle
                raise _Problem(f"pickle data was truncated (an argument at offset {position - size - 1} runs past "
                               f"the end of the data)")
            position += length
            if length > 4096:
                reach = 256
        else:
            position += 1
        if action == _STOP:
            return
        if action in (_INDEX_ARG, _PUT_LINE, _MEMOIZE):
            if index is not None and index >= puts + _MEMO_SLACK:
                raise _Problem(f"a memo index far beyond the {puts} memo writes before it")
            puts += 1


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only hands out safe objects and stand-ins.

    ``persistent_load`` delegates to ``load_persistent`` (the zip or legacy storage resolver); pickles with no
    persistent ids (plain ``pickle.dump``) get none.
    """

    def __init__(self, file: Any, resolve: Callable[[str, str], Any],
                 load_persistent: Callable[[Any], Any] | None = None):
        super().__init__(file, encoding="utf-8")
        self._resolve, self._load_persistent = resolve, load_persistent

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Problem(f"a global is named by {type(module).__name__}/{type(name).__name__}, not strings")
        return self._resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._load_persistent is None:
            raise _Problem("unexpected persistent id in a plain pickle")
        return self._load_persistent(pid)


@dataclass
class LazyFile:
    """An unpickled checkpoint: ``obj`` holds ``LazyTensor``s that read from the still-open file."""

    path: Path
    obj: Any
    layout: str  # "zip", "legacy" or "pickle"
    _handle: _FileHandle
    _archive: zipfile.ZipFile | None = None

    @property
    def file_size(self) -> int:
        return self._handle.size

    def close(self) -> None:
        """Close the file; tensors not yet read can no longer be read."""
        if self._archive is not None:
            self._archive.close()
            self._archive = None
        self._handle.close()

    def __enter__(self) -> LazyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Loader:
    """Parses one file; holds the per-file state (stand-in classes, zip records, legacy storages)."""

    def __init__(self, path: Path, handle: _FileHandle):
        self.path, self.handle = path, handle
        self._standins: dict[str, type] = {}
        self._blob_depth = 0
        self._streams: list[_Stream] = []
        self.archive: zipfile.ZipFile | None = None
        self.needs_archive = False  # kept open only when a record is compressed

    def close_archive(self) -> None:
        if self.archive is not None:
            self.archive.close()
            self.archive = None

    # -- globals -----------------------------------------------------------------------------------------------

    def resolve(self, module: str, name: str, py2_names: bool = False) -> Any:
        if py2_names:  # what pickle's fix_imports does for protocol 0-2: Python 2 names -> Python 3 names
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        module = _RENAMED_MODULES.get(module, module)
        qualname = f"{module}.{name}"
        if qualname in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[qualname]
        if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
            return StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_CONSTANTS:
            return _TORCH_CONSTANTS[name]
        if qualname == "torch.storage._load_from_bytes":
            return _SafeCallable(qualname, self._load_from_bytes)
        if module == "torch._utils" and name in _UNSUPPORTED_REBUILDS:
            return _unsupported(_UNSUPPORTED_REBUILDS[name], qualname)
        cls = self._standins.get(qualname)
        if cls is None:
            cls = self._standins[qualname] = _standin_class(module, name)
        if qualname in _INERT_CALLS:
            return _SafeCallable(qualname, _record_call(cls))
        return cls

    def unpickle(self, stream: _Stream, load_persistent: Callable[[Any], Any] | None = None) -> Any:
        head = stream.span.pread(stream.position, 2)
        protocol = head[1] if head[:1] == b"\x80" and len(head) == 2 else 0
        resolve = functools.partial(self.resolve, py2_names=protocol < 3)
        _check_opcodes(stream.span, stream.position)
        return SafeUnpickler(stream, resolve, load_persistent).load()

    # -- layouts -----------------------------------------------------------------------------------------------

    def load(self) -> tuple[Any, str]:
        head = self.handle.pread(0, 512)
        if not head:
            raise _Problem("file is empty", standalone=True)
        if head.startswith(b"PK\x03\x04"):
            return self._load_zip(), "zip"
        if head[257:262] == b"ustar":
            raise _Problem("this is a tar-format torch.save file (PyTorch 0.3 or older), which soupkit does not "
                           "read; load and re-save it with a current torch", standalone=True)
        stream = _Stream(_Span(self.handle, 0, self.handle.size), skip_large=True)
        self._streams.append(stream)
        first = self.unpickle(stream)
        if type(first) is int and first == LEGACY_MAGIC:
            return self._load_legacy(stream), "legacy"
        return first, "pickle"

    def _load_zip(self) -> Any:
        try:
            archive = zipfile.ZipFile(self.path)  # owns (and closes) its file
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
            raise _Problem(f"truncated or corrupt zip archive ({err})") from None
        self.archive = archive
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in infos if name.endswith("/data.pkl") and name.count("/") == 1]
        if not pickles:
            raise _Problem("zip archive without a <archive>/data.pkl record (not a torch.save file)")
        first_dir = next(iter(infos)).split("/", 1)[0]
        data_pkl = next((p for p in pickles if p.split("/", 1)[0] == first_dir), pickles[0])
        prefix = data_pkl[: -len("/data.pkl")]
        if f"{prefix}/constants.pkl" in infos or any(n.startswith(f"{prefix}/code/") for n in infos):
            raise _Problem("this is a TorchScript archive (torch.jit.save), which soupkit does not read; save the "
                           "model's state_dict() with torch.save instead", standalone=True)
        byteorder = b"little"
        if f"{prefix}/byteorder" in infos:
            byteorder = self._zip_read(archive, f"{prefix}/byteorder")
            if byteorder not in (b"little", b"big"):
                raise _Problem("the byteorder record is neither 'little' nor 'big'")
        swap = byteorder.decode() != "little"
        storages: dict[str, LazyStorage] = {}

        def load_persistent(pid: Any) -> LazyStorage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
                raise _Problem(f"unexpected persistent id {str(pid)[:80]}")
            _, storage_type, key, _location, numel = pid
            dtype = self._storage_dtype(storage_type)
            if not isinstance(key, str):
                raise _Problem(f"storage key {key!r} is not a string")
            nbytes = _int(numel, "a storage size") * dtype.itemsize
            if key in storages:
                return storages[key]
            record = f"{prefix}/data/{key}"
            info = infos.get(record)
            if info is None:
                raise _Problem(f"record {record} is missing from the zip archive")
            if info.file_size < nbytes:
                raise _Problem(f"record {record} holds {info.file_size} bytes but its storage needs {nbytes}")
            if info.compress_type == zipfile.ZIP_STORED:
                source: _Span = _ZipStoredRecord(self.handle, info.header_offset, info.file_size, record)
                _ = source.start  # read the local header now, so reading a tensor later is one pread
            else:
                _check_inflation(info)
                source = _ZipCompressedRecord(self.handle, lambda: archive, info.file_size, record)
                self.needs_archive = True
            storages[key] = LazyStorage(source, 0, nbytes, dtype, name=self.handle.name, swap=swap)
            return storages[key]

        payload = self._zip_read(archive, data_pkl)
        span = _Span(None, 0, len(payload), payload)
        return self.unpickle(_Stream(span), load_persistent)

    def _zip_read(self, archive: zipfile.ZipFile, name: str) -> bytes:
        """A small record (``data.pkl``, ``byteorder``) in full. A stored record is read straight from the file
        (one pread, bounded by the file's size, and without a CRC check: torch writes CRC 0 when
        ``torch.serialization.set_crc32_options(False)``); a compressed one only up to ``MAX_INFLATION`` times
        its compressed size, checked before a byte is inflated."""
        info = archive.getinfo(name)
        if info.compress_type == zipfile.ZIP_STORED:
            return _ZipStoredRecord(self.handle, info.header_offset, info.file_size, name).pread(0, info.file_size)
        _check_inflation(info)
        try:
            with archive.open(info) as member:
                return member.read(info.file_size)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError, NotImplementedError) as err:
            raise _Problem(f"cannot read zip record {name} ({err})") from None

    @staticmethod
    def _storage_dtype(storage_type: Any) -> torch.dtype:
        if isinstance(storage_type, StorageType):
            return storage_type.dtype
        raise _Problem(f"unknown storage type {storage_type!r}")

    def _load_legacy(self, stream: _Stream) -> Any:
        """Parse the rest of a legacy ``torch.save`` stream, whose magic-number pickle ``stream`` has read."""
        span = stream.span
        if self.unpickle(stream) != LEGACY_PROTOCOL:
            raise _Problem("unsupported legacy torch.save protocol version")
        sys_info = self.unpickle(stream)
        if not isinstance(sys_info, dict):
            raise _Problem("legacy torch.save header is not a dict")
        roots: dict[str, LazyStorage] = {}
        views: dict[str, LazyStorage] = {}

        def load_persistent(pid: Any) -> Any:
            if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage", "module", b"module"):
                raise _Problem(f"unexpected persistent id {str(pid)[:80]}")
            if pid[0] in ("module", b"module"):
                return pid[1] if len(pid) > 1 else None  # a class reference; it is only ever instantiated inertly
            if len(pid) != 6:
                raise _Problem(f"malformed storage id {str(pid)[:80]}")
            _, storage_type, root_key, _location, numel, view = pid
            dtype = self._storage_dtype(storage_type)
            if not isinstance(root_key, str):
                raise _Problem(f"storage key {root_key!r} is not a string")
            nbytes = _int(numel, "a storage size") * dtype.itemsize
            if root_key not in roots:
                # the data offset is known once the main pickle and the key list are read
                roots[root_key] = LazyStorage(_Span(span.handle, -1, 0, b""), 0, nbytes, dtype, name=self.handle.name)
            root = roots[root_key]
            if view is None:
                return root
            if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
                raise _Problem(f"malformed storage view {str(view)[:80]}")
            view_key, offset, size = view
            if view_key not in views:
                itemsize = root.dtype.itemsize
                views[view_key] = root.view(_int(offset, "a view offset") * itemsize,
                                            _int(size, "a view size") * itemsize, root.dtype)
            return views[view_key]

        obj = self.unpickle(stream, load_persistent)
        keys = self.unpickle(stream)  # the storage data starts after this last pickle
        self._place_legacy_storages(span, stream.position, keys, roots)
        return obj

    @staticmethod
    def _place_legacy_storages(span: _Span, position: int, keys: Any, roots: dict[str, LazyStorage]) -> None:
        """Point each storage of a legacy stream at its bytes: after the pickles come, per key in ``keys``, an
        int64 element count and the raw data."""
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)) or len(set(keys)) != len(keys):
            raise _Problem("legacy torch.save storage-key list is malformed")
        for key in keys:
            root = roots.get(key)
            if root is None:
                raise _Problem(f"storage {key} has data but no tensor refers to it")
            header = span.pread(position, 8)
            if len(header) < 8:
                raise _Problem(f"file is truncated: storage {key} is missing")
            (count,) = struct.unpack("<q", header)
            if count < 0 or count * root.dtype.itemsize != root.nbytes:
                raise _Problem(f"storage {key} holds {count} elements but its tensors claim "
                               f"{root.nbytes // root.dtype.itemsize}")
            position += 8
            if position + root.nbytes > span.length:
                raise _Problem(f"file is truncated: storage {key} ends past the end of the data")
            source = root._source
            source._start, source.length = span.start + position, root.nbytes
            source.prefix = span.prefix[position : position + root.nbytes]
            position += root.nbytes
        stored = set(keys)
        missing = [k for k in roots if k not in stored]
        if missing:
            raise _Problem(f"storage {missing[0]} is referred to but not stored")

    def _load_from_bytes(self, blob: Any) -> Any:
        """``torch.storage._load_from_bytes(b)``: ``b`` is a legacy ``torch.save`` of one storage."""
        if not isinstance(blob, bytes):
            raise _Problem(f"_load_from_bytes of a {type(blob).__name__}")
        if self._blob_depth >= _MAX_BLOB_DEPTH:
            raise _Problem("nested _load_from_bytes payloads")
        end = _address(blob) + len(blob) if blob else -1
        skipped = None
        for stream in self._streams:
            skipped = stream.skipped.pop(end, None)
            if skipped is not None:
                break
        if skipped is None:
            span = _Span(None, 0, len(blob), blob)  # small payload: read in full, kept in memory
        else:
            offset, length = skipped
            before = len(blob) - length  # bytes the unpickler already held in its own buffer: real data
            span = _Span(self.handle, offset - before, len(blob), blob[:before])  # the rest is read from the file
        self._blob_depth += 1
        try:
            stream = _Stream(span)
            if self.unpickle(stream) != LEGACY_MAGIC:
                raise _Problem("_load_from_bytes payload is not a torch.save blob")
            return self._load_legacy(stream)
        finally:
            self._blob_depth -= 1


def _malformed(err: BaseException) -> str:
    """What a parser error on malformed bytes means, in the user's words."""
    if isinstance(err, EOFError) or "truncated" in str(err) or "Ran out of input" in str(err):
        return "the file ends too early (truncated?)"
    return "its bytes are neither a torch.save zip archive nor a pickled state dict"


def open_lazy(path: str | Path) -> LazyFile:
    """Unpickle a torch checkpoint (any of the three layouts) without reading tensor data or running code.

    Raises ``CheckpointError`` naming the file for anything malformed or refused.
    """
    path = Path(path)
    handle = _FileHandle(path)
    loader = _Loader(path, handle)
    try:
        obj, layout = loader.load()
    except BaseException as err:
        loader.close_archive()
        handle.close()
        if isinstance(err, _Problem):
            prefix = "" if err.standalone else "not a valid torch checkpoint: "
            raise CheckpointError(f"{path}: {prefix}{_printable(str(err))}") from None
        if isinstance(err, CheckpointError) or not isinstance(err, Exception):
            raise
        # anything the pickle machinery raises on malformed bytes (UnpicklingError, EOFError, ValueError from
        # `invalid literal for int()` ...): its wording is the parser's, not the user's
        raise CheckpointError(f"{path}: not a valid torch checkpoint: {_malformed(err)}") from None
    if not loader.needs_archive:
        loader.close_archive()
    return LazyFile(path, obj, layout, handle, loader.archive)


# ---------------------------------------------------------------------------------------------------------------
# nn.Module stand-ins -> flat state dicts


def _module_state(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, Opaque):
        return None
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]
    if isinstance(state, dict) and ("_parameters" in state or "_modules" in state):
        return state
    return None


def _walk(state: dict[str, Any], prefix: str, stack: list[int]) -> Iterator[tuple[str, LazyTensor]]:
    listed = state.get("_non_persistent_buffers_set")
    skip = {n for n in listed if isinstance(n, str)} if isinstance(listed, (set, frozenset, list, tuple)) else set()
    for group in ("_parameters", "_buffers"):
        members = state.get(group)
        if not isinstance(members, Mapping):
            continue
        for name, value in members.items():
            if isinstance(value, LazyTensor) and not (group == "_buffers" and isinstance(name, str) and name in skip):
                yield f"{prefix}{name}", value
    children = state.get("_modules")
    if not isinstance(children, Mapping):
        return
    for name, child in children.items():
        child_state = _module_state(child)
        if child_state is None:
            continue
        if id(child_state) in stack:
            raise _Problem(f"module {prefix}{name} contains itself")
        stack.append(id(child_state))
        yield from _walk(child_state, f"{prefix}{name}.", stack)
        stack.pop()


def flatten_module(obj: Any, *, source: str = "<pickled module>") -> dict[str, LazyTensor] | None:
    """A pickled ``nn.Module`` stand-in as the flat dict ``module.state_dict()`` would give, or None.

    Walks ``_parameters``, ``_buffers`` (minus ``_non_persistent_buffers_set``) and ``_modules`` of each
    ``BUILD`` state, joining names with '.'; ``None`` entries are skipped. A stand-in of a dict subclass (e.g.
    Lightning's ``AttributeDict``) gives its items instead, so containers inside it can be searched.
    ``source`` names the file in errors.
    """
    state = _module_state(obj)
    if state is None:
        if isinstance(obj, Opaque) and obj.dictitems:
            return dict(obj.dictitems)
        return None
    try:
        return dict(_walk(state, "", [id(state)]))
    except RecursionError:
        raise CheckpointError(f"{source}: the pickled module tree is nested too deeply") from None
    except _Problem as err:
        raise CheckpointError(f"{source}: {err}") from None
