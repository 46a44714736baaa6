"""The lazy checkpoint-reader interface every format implements.

A reader knows each tensor's key, shape and dtype from the file's header/index without reading tensor data,
and reads one tensor (or one flat element range of it, for chunked streaming) on request.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from soupkit.errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    """What a reader knows about one tensor before reading it."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex


def refuse_complex(name: str, key: str, dtype: torch.dtype) -> None:
    """Every reader refuses complex tensors: merges average real numbers, and writing the mean of complex
    tensors through a real dtype would silently drop the imaginary part."""
    if dtype.is_complex:
        raise CheckpointError(f"{name}: tensor {key!r} is complex ({str(dtype).replace('torch.', '')}); soupkit "
                              f"merges real tensors only (store the real and imaginary parts as two tensors)")


#: an expanded (stride-0) view may be materialised up to this factor over its stored bytes, or up to 1 GiB
MAX_EXPANSION = 64
MAX_EXPANDED_BYTES = 1 << 30


def refuse_expansion(name: str, key: str, shape: tuple[int, ...], stride: tuple[int, ...],
                     dtype: torch.dtype) -> None:
    """Every reader refuses views that would blow up in memory: a stride-0 (expanded) view can claim petabytes
    over a few stored bytes, and materialising it, or planning a merge by its claimed size (numel / chunk
    steps), would take the machine. Checked when a reader opens, before anything plans work."""
    numel = math.prod(shape)
    if numel == 0:
        return
    span = sum((size - 1) * step for size, step in zip(shape, stride)) + 1
    stored, claimed = span * dtype.itemsize, numel * dtype.itemsize
    if claimed > max(MAX_EXPANSION * stored, MAX_EXPANDED_BYTES):
        raise CheckpointError(f"{name}: tensor {key!r} is a {tuple(shape)} view of {stored:,} stored bytes; "
                              f"materialising it would take {claimed:,} bytes, so soupkit refuses it")


class CheckpointReader(ABC):
    """Lazy access to a checkpoint's tensors.

    ``keys()``/``info()`` never touch tensor data. ``get(key)`` returns a CPU tensor that owns its memory
    (not a view into a memory map, so nothing stays resident after the caller drops it). ``read_flat`` reads
    elements ``[start, stop)`` of the tensor flattened in row-major order, which lets the merge engine stream
    tensors larger than it wants to hold.
    """

    #: a label for messages: the file path, or "<state dict #i>" for in-memory inputs
    name: str
    #: the file on disk, or None for in-memory inputs
    path: Path | None = None

    @abstractmethod
    def keys(self) -> list[str]:
        """Tensor names in file order."""

    @abstractmethod
    def info(self, key: str) -> TensorInfo:
        """Shape and dtype of ``key`` (KeyError if absent)."""

    @abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """The whole tensor, shaped, on the CPU."""

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, 1-D, on the CPU. Formats with contiguous
        on-disk layout override this to read only that byte range."""
        return self.get(key).reshape(-1)[start:stop].clone()

    def read_flat_into(self, key: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Like ``read_flat`` but into ``buffer`` (a 1-D uint8 CPU tensor of exactly the chunk's byte size), so
        the merge engine can recycle its read buffers. Returns ``buffer`` viewed as the tensor's dtype."""
        data = self.read_flat(key, start, stop)
        buffer.copy_(data.reshape(-1).view(torch.uint8))
        return buffer.view(data.dtype)

    def map_flat(self, key: str, start: int, stop: int) -> torch.Tensor | None:
        """Elements ``[start, stop)`` of the flattened tensor without copying them: a private (copy-on-write)
        memory map of just that byte range, unmapped when the tensor is freed. None where the format or the
        system cannot (the caller then uses ``read_flat_into``)."""
        return None

    @property
    def metadata(self) -> dict[str, str]:
        """Free-form string metadata (safetensors ``__metadata__``); empty where the format has none."""
        return {}

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(self.info(k).nbytes for k in self.keys())

    @property
    def file_size(self) -> int | None:
        """Size of the file(s) on disk, or None for in-memory inputs."""
        return None

    def infos(self) -> dict[str, TensorInfo]:
        return {k: self.info(k) for k in self.keys()}

    def __contains__(self, key: object) -> bool:
        # O(1) per test: a merge of 100k tensors asks once per key and input; readers are immutable once open
        keyset = self.__dict__.get("_key_set")
        if keyset is None:
            keyset = self.__dict__["_key_set"] = frozenset(self.keys())
        return key in keyset

    def tied_keys(self) -> dict[str, str]:
        """Keys that name the same tensor as another key (``alias -> canonical``): tied embeddings a folder's
        ``config.json`` declares, or tensors sharing storage. ``inspect`` counts their parameters once."""
        return {}

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} tensors)"
