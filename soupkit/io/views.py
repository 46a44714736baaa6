"""Readers that rename another reader's keys without reading its tensors: ``--strip-prefix`` / ``--add-prefix``
(a Lightning module's ``model.``) and the tied keys a Hugging Face folder omits (``lm_head.weight`` read from
``transformer.wte.weight``). Every lookup is a dict access: O(1) per key whatever the checkpoint's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from soupkit.errors import CheckpointError, ParameterError
from soupkit.io.base import CheckpointReader, TensorInfo


class KeyMapReader(CheckpointReader):
    """``inner`` seen through ``mapping`` (``new key -> inner key``, in the order to show). Several new keys
    may name one inner key (an alias); ``tied`` lists such aliases for ``inspect``."""

    def __init__(self, inner: CheckpointReader, mapping: Mapping[str, str], *, tied: Mapping[str, str] = ()):
        self.inner = inner
        self.name = inner.name
        self.path = inner.path
        self._map = dict(mapping)
        self._tied = dict(tied)

    def keys(self) -> list[str]:
        return list(self._map)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def info(self, key: str) -> TensorInfo:
        info = self.inner.info(self._map[key])
        return TensorInfo(key, info.shape, info.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self.inner.get(self._map[key])

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.inner.read_flat(self._map[key], start, stop)

    def read_flat_into(self, key: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        return self.inner.read_flat_into(self._map[key], start, stop, buffer)

    def map_flat(self, key: str, start: int, stop: int) -> torch.Tensor | None:
        return self.inner.map_flat(self._map[key], start, stop)

    def tied_keys(self) -> dict[str, str]:
        renamed: dict[str, str] = {}
        for new, old in self._map.items():
            renamed.setdefault(old, new)
        ties = {renamed[a]: renamed[c] for a, c in self.inner.tied_keys().items() if a in renamed and c in renamed}
        return {**ties, **self._tied}

    @property
    def metadata(self) -> dict[str, str]:
        return self.inner.metadata

    @property
    def file_size(self) -> int | None:
        return self.inner.file_size

    @property
    def files(self) -> list[Path]:
        from soupkit.io import input_files  # cycle: soupkit.io re-exports this module's views

        return input_files(self.inner)

    def close(self) -> None:
        self.inner.close()


def with_prefix(reader: CheckpointReader, *, strip: str | None = None, add: str | None = None) -> CheckpointReader:
    """``reader`` with ``strip`` removed from its key names (keys without it are left out: a Lightning module's
    ``model.`` keeps the network and drops the loss's buffers) and then ``add`` put in front of every name."""
    if not strip and not add:
        return reader
    for option, value in (("strip_prefix", strip), ("add_prefix", add)):
        if value is not None and not isinstance(value, str):
            raise ParameterError(f"{option} must be a string, got {type(value).__name__}")
    mapping = {}
    for key in reader.keys():
        if strip:
            if not key.startswith(strip):
                continue
            new = key[len(strip):]
        else:
            new = key
        mapping[(add or "") + new] = key
    if not mapping:
        shown = [k for k in reader.keys()[:4]]
        raise CheckpointError(f"{reader.name}: no tensor name starts with the prefix {strip!r} to strip "
                              f"(names look like {shown})")
    if any(not new.split(".")[0] for new in mapping):
        raise ParameterError(f"--strip-prefix {strip!r} leaves names starting with '.'; include the dot "
                             f"(e.g. {strip.rstrip('.') + '.'!r})")
    return KeyMapReader(reader, mapping)
