"""PyTorch-format checkpoints (``.pt/.pth/.bin/.ckpt``): a lazy reader built on the restricted unpickler.

The file is unpickled once when opened (no tensor bytes are read, no pickled code runs: see ``safe_pickle``),
the weights are found inside whatever container the training code saved (``unwrap_state_dict``), and each
tensor is read on request with one ``os.pread`` into memory it owns. The layout (zip, legacy ``torch.save``
or a plain pickle) is detected from the content, never from the extension.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from soupkit import interrupt
from soupkit.errors import OutputError, suggest
from soupkit.io.base import CheckpointReader, TensorInfo, refuse_complex, refuse_expansion
from soupkit.io.safe_pickle import LazyTensor, flatten_module, open_lazy
from soupkit.io.unwrap import unwrap_state_dict

__all__ = ["TorchReader", "save_torch"]


class TorchReader(CheckpointReader):
    """Lazy reader for one PyTorch checkpoint; ``ema=True`` picks the EMA weights it holds."""

    def __init__(self, path: str | Path, *, ema: bool = False):
        self.path = Path(path)
        self.name = str(path)
        self._file = open_lazy(self.path)
        try:
            self._tensors: dict[str, LazyTensor] = unwrap_state_dict(
                self._file.obj,
                source=self.name,
                is_tensor=lambda value: isinstance(value, LazyTensor),
                flatten_object=functools.partial(flatten_module, source=self.name),
                ema=ema,
            )
            for key, lazy in self._tensors.items():
                refuse_complex(self.name, key, lazy.dtype)
                # at open, before anything plans work by the claimed size (a merge's steps are numel / chunk)
                if not lazy.is_contiguous():
                    refuse_expansion(self.name, key, tuple(lazy.shape), tuple(lazy.stride), lazy.dtype)
        except BaseException:
            self._file.close()
            raise

    def _lazy(self, key: str) -> LazyTensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a tensor in {self.name}.{suggest(key, self._tensors)}") from None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        lazy = self._lazy(key)
        return TensorInfo(key, lazy.shape, lazy.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self._lazy(key).materialize()

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._lazy(key).read_flat(start, stop)

    @property
    def layout(self) -> str:
        """How the file was written: "zip", "legacy" (non-zip ``torch.save``) or "pickle" (``pickle.dump``)."""
        return self._file.layout

    @property
    def file_size(self) -> int:
        return self._file.file_size

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def tied_keys(self) -> dict[str, str]:
        """Keys viewing the very bytes of an earlier key: weights tied when ``torch.save`` ran (storage shared)."""
        first: dict[tuple, str] = {}
        ties = {}
        for key, lazy in self._tensors.items():
            where = (id(lazy.storage._source), lazy.storage._offset, lazy.storage_offset, lazy.shape, lazy.stride,
                     lazy.dtype)
            ties.update({key: first[where]} if where in first else {})
            first.setdefault(where, key)
        return ties

    def close(self) -> None:
        self._file.close()


def save_torch(state_dict: Mapping[str, torch.Tensor], handle: BinaryIO, *, name: str,
               container: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> None:
    """``torch.save`` of ``state_dict`` (a plain dict, zip format; ``container`` wraps it, e.g. in a Lightning
    checkpoint dict) into ``handle``, an open binary file (the atomic temporary of an ``OutputSet``); ``name`` is
    the path messages give. Each tensor is saved on its own: a view of a larger storage is cloned so the file does
    not carry the rest of that storage."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        interrupt.check()  # each tensor is copied to the CPU (and maybe cloned) before torch.save starts
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise OutputError(f"{name}: state dict values must be tensors and keys strings; got "
                              f"{type(key).__name__} -> {type(value).__name__}")
        tensor = value.detach().cpu()
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        tensors[key] = tensor
    try:
        torch.save(container(tensors) if container is not None else tensors, handle)
    except OSError as err:
        raise OutputError(f"{name}: cannot write output: {err.strerror}") from None
    except RuntimeError as err:
        raise _write_failure(err, name) from None


def _write_failure(err: RuntimeError, name: str) -> BaseException:
    """What really stopped ``torch.save``. Its zip writer finishes the archive in ``__exit__`` even when a write
    failed, and that raises "RuntimeError: unexpected pos" over the real cause: Ctrl-C or SIGTERM (re-raised as
    they are, so the CLI exits 130/143 with one line and the temporary is removed) or a full disk."""
    cause: BaseException | None = err.__context__
    while cause is not None:
        if isinstance(cause, (KeyboardInterrupt, interrupt.Stopped)):
            return cause
        if isinstance(cause, OSError):
            return OutputError(f"{name}: cannot write output: {cause.strerror or cause}")
        cause = cause.__context__
    return err
