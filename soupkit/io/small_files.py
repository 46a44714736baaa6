"""The small files of a model folder (``config.json``, tokenizer files, ``adapter_config.json``, ...): the one place
soupkit opens them, and only as regular files that lie inside the folder.

A folder is untrusted input, and its small files are read (ties, adapter configs, the evaluation fingerprint)
and copied into outputs (a folder output carries its template's tokenizer). Following a link there would read,
and publish, whatever the link names: ``config.json -> ~/.ssh/id_rsa`` (a mode-0600 file copied out world-readable),
``special_tokens_map.json -> /proc/self/environ`` (the process's tokens), ``added_tokens.json -> /proc/self/pagemap``
(reads that never end). So here:

- a name is one path component, looked up in the folder opened once (``dir_fd``), with ``O_NOFOLLOW``: the entry
  itself is opened, never what a link names;
- a symlink is read only when it resolves to a file inside the folder, or -- the Hugging Face cache layout,
  ``snapshots/<rev>/config.json -> ../../blobs/<sha>`` -- inside the ``blobs/`` folder of the same cache repo; the
  resolved file is then opened component by component from that root with ``O_NOFOLLOW``, so a link swapped in
  meanwhile fails instead of being followed;
- the opened descriptor must be a regular file (``fstat``: never a FIFO, device, socket or folder; FIFOs and
  devices are recognised by ``lstat`` before any open, and the open is non-blocking regardless);
- its size is bounded, and at most the bound plus one byte is ever read (a file growing while read is refused).

A hard link is a regular file whose name lies in the folder: it is read like any other file (the kernel's
``protected_hardlinks``, on by default, stops a user from linking a file they could not read or write). Copies never
get wider permissions than their source: a mode-0600 ``config.json`` gives a mode-0600 copy.

Every refusal is an ``UnsafeFileError`` (a ``CheckpointError``) naming the file; callers decide what a refusal means
(``hf_folder``: a folder whose small file is refused is refused as a whole).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from soupkit.errors import CheckpointError

__all__ = ["MAX_COPY_BYTES", "MAX_JSON_BYTES", "UnsafeFileError", "copy_small_file", "entry_kind",
           "open_small_file", "read_json_file", "read_small_file"]

#: the largest small file copied into an output (streamed: memory stays one block). Tokenizers of 250k-token
#: vocabularies are ~35 MB; 256 MiB leaves room for merges-heavy ones and stops a sparse 10 GB "tokenizer.json".
MAX_COPY_BYTES = 256 * 2**20
#: the largest JSON small file parsed in memory (a config.json is a few KB; an adapter config a few hundred)
MAX_JSON_BYTES = 16 * 2**20
_BLOCK = 1 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_OPEN_FILE = os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(
    os, "O_CLOEXEC", 0)
_OPEN_DIR = os.O_RDONLY | _O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


class UnsafeFileError(CheckpointError):
    """A small file that is not a bounded regular file inside its folder; the message names it."""


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def entry_kind(folder: str | Path, name: str) -> str | None:
    """What ``folder/name`` is, links not followed: "file", "dir", "link" or "other"; None when absent."""
    try:
        mode = os.lstat(Path(folder) / name).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return "other"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "link" if stat.S_ISLNK(mode) else "other"


def _roots(folder: Path) -> list[Path]:
    """Where a symlink in ``folder`` may lead: the folder, and for a Hugging Face cache snapshot its repo's blobs."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def _open_below(root: Path, relative: Path, path: Path) -> int:
    """Open ``root/relative`` walking one component at a time with ``O_NOFOLLOW`` (no link is ever followed)."""
    parts = relative.parts
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise UnsafeFileError(f"{path}: is a symlink that does not name a file inside the folder")
    current = os.open(root, _OPEN_DIR)
    try:
        for part in parts[:-1]:
            step = os.open(part, _OPEN_DIR | _O_NOFOLLOW, dir_fd=current)
            os.close(current)
            current = step
        return _open_entry(current, parts[-1], path)
    finally:
        os.close(current)


def _open_entry(dir_fd: int, name: str, path: Path) -> int:
    """Open the entry ``name`` of ``dir_fd`` itself (never a link's target); FIFOs and devices are not opened."""
    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(f"{path}: is {_kind(mode)}, not a regular file; soupkit reads only regular files "
                              f"inside the folder (see SECURITY.md)")
    try:
        return os.open(name, _OPEN_FILE, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:  # swapped for a link since the lstat
            raise UnsafeFileError(f"{path}: changed into a symlink while it was opened") from None
        raise


def open_small_file(folder: str | Path, name: str, *, limit: int = MAX_COPY_BYTES) -> tuple[int, os.stat_result]:
    """``(fd, fstat)`` of ``folder/name`` opened read-only, when it is a regular file of at most ``limit`` bytes
    inside ``folder`` (see the module docstring for links). Raises ``FileNotFoundError`` when absent and
    ``UnsafeFileError`` naming the file otherwise; the caller closes the descriptor."""
    folder = Path(folder)
    path = folder / name
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UnsafeFileError(f"{path}: {name!r} is not a file name inside the folder")
    try:
        dir_fd = os.open(folder, _OPEN_DIR)  # the folder itself as the user named it (links followed there)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise UnsafeFileError(f"{path}: cannot open its folder: {err.strerror}") from None
    try:
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            fd = _open_link(folder, path) if stat.S_ISLNK(mode) else _open_entry(dir_fd, name, path)
        except (UnsafeFileError, FileNotFoundError):
            raise
        except OSError as err:
            raise UnsafeFileError(f"{path}: cannot open: {err.strerror}") from None
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path}: is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise UnsafeFileError(f"{path}: is {info.st_size:,} bytes; soupkit reads or copies small files of at "
                                  f"most {limit:,} bytes; remove it from the folder if it is not needed")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _open_link(folder: Path, path: Path) -> int:
    try:
        target = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        raise UnsafeFileError(f"{path}: is a symlink to nothing (dangling)") from None
    except OSError as err:
        raise UnsafeFileError(f"{path}: is a symlink that cannot be resolved: {err.strerror or 'a loop'}") from None
    for root in _roots(folder):
        if target.is_relative_to(root) and target != root:
            return _open_below(root, target.relative_to(root), path)
    raise UnsafeFileError(f"{path}: is a symlink to a file outside the folder; soupkit never reads or copies files "
                          f"outside an input folder (see SECURITY.md)")


@contextmanager
def opened(folder: str | Path, name: str, *, limit: int = MAX_COPY_BYTES) -> Iterator[tuple[int, os.stat_result]]:
    """``open_small_file`` as a context manager that closes the descriptor."""
    fd, info = open_small_file(folder, name, limit=limit)
    try:
        yield fd, info
    finally:
        os.close(fd)


def _read_bounded(fd: int, limit: int, path: Path) -> Iterator[bytes]:
    """The file's blocks, refusing it once more than ``limit`` bytes arrive (it grew after the fstat)."""
    total = 0
    while True:
        block = os.read(fd, min(_BLOCK, limit + 1 - total))
        if not block:
            return
        total += len(block)
        if total > limit:
            raise UnsafeFileError(f"{path}: grew past {limit:,} bytes while it was read")
        yield block


def read_small_file(folder: str | Path, name: str, *, limit: int = MAX_JSON_BYTES) -> bytes | None:
    """The bytes of ``folder/name`` (rules above), or None when the folder has no such entry."""
    try:
        with opened(folder, name, limit=limit) as (fd, _):
            return b"".join(_read_bounded(fd, limit, Path(folder) / name))
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_json_file(folder: str | Path, name: str, *, limit: int = MAX_JSON_BYTES) -> dict[str, Any] | None:
    """``folder/name`` parsed as a JSON object, or None when absent; a file that is not one is refused by name."""
    data = read_small_file(folder, name, limit=limit)
    if data is None:
        return None
    path = Path(folder) / name
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: not valid JSON (truncated or corrupt); fix or restore it") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def copy_small_file(folder: str | Path, name: str, handle: BinaryIO, *, limit: int = MAX_COPY_BYTES) -> int:
    """Stream ``folder/name`` (rules above) into ``handle``; returns the source's permission bits, which the copy
    must not exceed. Raises ``FileNotFoundError`` when it vanished."""
    with opened(folder, name, limit=limit) as (fd, info):
        for block in _read_bounded(fd, limit, Path(folder) / name):
            handle.write(block)
    return stat.S_IMODE(info.st_mode)


def check_small_file(folder: str | Path, name: str, *, limit: int = MAX_COPY_BYTES) -> int:
    """The size of ``folder/name`` after the checks above, opening but reading nothing."""
    with opened(folder, name, limit=limit) as (_, info):
        return info.st_size
