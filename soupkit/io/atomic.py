"""Safe outputs: validate output paths before any work, write to temporary files, publish atomically.

A merge's outputs (one file, several shards + an index, or one file per WiSE-FT alpha) are written to hidden
temporary files in the target directory, flushed and fsync'ed, and only then renamed into place together. A
crash, Ctrl-C, SIGTERM or a full disk leaves no partial output and no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from soupkit import interrupt
from soupkit.errors import OutputError

OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def check_output_path(path: str | Path, *, inputs: Iterable[Path] = (), force: bool = False) -> Path:
    """Refuse outputs that would lose data or fail late; returns the path. Called before reading tensors."""
    out = Path(path)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputError(f"{out}: output must end in .safetensors (or .pt/.pth/.bin for torch.save)")
    _check(out, tuple(Path(p) for p in inputs), force)
    return out


def check_derived_output(path: str | Path, *, inputs: Iterable[Path] = (), force: bool = False) -> Path:
    """Check a file named only once the tensors are planned (a shard or the index of a sharded write) the way
    its output was checked: never one of the inputs, and replaced only with ``force``."""
    out = Path(path)
    _check(out, tuple(Path(p) for p in inputs), force)
    return out


#: the longest file name (one path component, in bytes) ext4, xfs, btrfs, APFS and NTFS allow
NAME_MAX = 255
_TMP_SUFFIX = ".soupkit-tmp"


def _check_name(out: Path) -> None:
    """A component longer than the file system allows fails at open() with a raw ENAMETOOLONG; say so first."""
    for part in out.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise OutputError(f"{out}: a file or folder name in the output path is {size} bytes long; file "
                              f"systems allow at most {NAME_MAX}")


def _temporary(target: Path) -> Path:
    """A hidden temporary next to ``target``; its name is shortened where the full one would pass NAME_MAX."""
    token = secrets.token_hex(4)
    name = f".{target.name}.{token}{_TMP_SUFFIX}"
    if len(os.fsencode(name)) > NAME_MAX:
        name = f".soupkit.{token}{_TMP_SUFFIX}"
    return target.parent / name


def _check(out: Path, inputs: tuple[Path, ...], force: bool) -> None:
    _check_name(out)
    if out.is_dir():
        raise OutputError(f"{out}: output path is a directory; give a file name like {out / 'soup.safetensors'}")
    resolved = out.resolve()
    for source_path in inputs:
        same = source_path.resolve() == resolved
        if not same and out.exists() and source_path.exists():
            same = os.path.samefile(source_path, out)
        if same:
            raise OutputError(f"{out}: output would overwrite the input {source_path}; soupkit never modifies "
                              f"inputs")
    if out.exists() and not force:
        raise OutputError(f"{out}: output exists; use --force to overwrite it")
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise OutputError(f"{out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: output directory {parent} is not writable")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputSet:
    """A group of output files published together.

    ``open(path)`` returns a binary file on a temporary name next to ``path``. ``commit()`` fsyncs and renames
    them all into place; ``abort()`` (or leaving the ``with`` block by an exception, including
    KeyboardInterrupt) deletes every temporary file. OS errors while writing become one-line ``OutputError``s.

    A recorded Ctrl-C / SIGTERM (``soupkit.interrupt``) stops ``commit()`` before the first rename. Once a
    command's ``output`` set is published the command finishes (``interrupt.published``); small files
    (``output=False``: reports, cache entries) do not mark that.
    """

    def __init__(self, *, output: bool = True) -> None:
        self._output = output
        self._files: list[tuple[Path, Path, BinaryIO]] = []
        self._made_dirs: list[Path] = []

    def open(self, path: str | Path) -> BinaryIO:
        target = Path(path)
        missing = []
        parent = target.parent.absolute()
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir()
            self._made_dirs.append(directory)
        tmp = _temporary(target)
        try:
            handle = open(tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        except OSError as err:
            raise OutputError(f"{target}: cannot create output: {err.strerror}") from None
        self._files.append((target, tmp, handle))
        return handle

    @property
    def temporary_paths(self) -> list[Path]:
        return [tmp for _, tmp, _ in self._files]

    def commit(self) -> list[Path]:
        try:
            for _, _, handle in self._files:
                interrupt.check()  # fsync can take a while on a busy disk: a signal stops the commit here...
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            interrupt.check()  # ...or here, the last moment before the outputs are published
        except OSError as err:
            target = next((t for t, _, h in self._files if not h.closed), self._files[-1][0])
            self.abort()
            raise OutputError(f"{target}: cannot write output: {err.strerror}") from None
        except BaseException:
            self.abort()
            raise
        for target, tmp, _ in self._files:
            os.replace(tmp, target)
        if self._output:
            interrupt.published()
        for directory in {t.parent.absolute() for t, _, _ in self._files}:
            _fsync_dir(directory)
        published = [t for t, _, _ in self._files]
        self._files = []
        self._made_dirs = []
        return published

    def abort(self) -> None:
        for _, tmp, handle in self._files:
            try:
                handle.close()
            except OSError:
                pass
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._files = []
        for directory in reversed(self._made_dirs):
            try:
                directory.rmdir()
            except OSError:
                pass
        self._made_dirs = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None:
            target = self._files[-1][0] if self._files else "output"
            self.abort()
            full = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
            if isinstance(exc, OSError) and exc.errno in full:
                raise OutputError(f"{target}: cannot write output: {exc.strerror}") from None
        elif self._files:
            self.commit()



def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a small file (a report, a plot, a cache entry) atomically: a temporary file beside ``path``
    (missing folders created), fsync'ed, then renamed over it, so a reader never sees half a file and a crash
    leaves the old one. OS errors become one-line ``OutputError``s naming ``path``."""
    target = Path(path)
    try:
        with OutputSet(output=False) as outputs:
            outputs.open(target).write(data)
    except OSError as err:
        raise OutputError(f"{target}: cannot write: {err.strerror or err}") from None
    return target


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``atomic_write_bytes`` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode())


def check_report_path(path: str | Path, *, inputs: Iterable[Path] = (), option: str = "output") -> Path:
    """Refuse a report file (JSON, PNG) that cannot be written, before any work: a directory, a missing or
    read-only folder, or one of the inputs. An existing report is replaced (it is not data)."""
    out = Path(path)
    if out.is_dir():
        raise OutputError(f"{option}: {out} is a directory; give a file name")
    for source_path in inputs:
        if Path(source_path).exists() and out.exists() and os.path.samefile(source_path, out):
            raise OutputError(f"{option}: {out} is one of the inputs; soupkit never modifies inputs")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{option}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option}: folder {parent} is not writable")
    return out


def write_small_file(path: str | Path, data: bytes, *, inputs: Iterable[Path] = (), option: str = "output") -> Path:
    """Write a small file (a report, a plot) whole and atomically: checked as ``check_report_path``, written to a
    temporary name beside it, fsync'ed and renamed into place."""
    return atomic_write_bytes(check_report_path(path, inputs=tuple(inputs), option=option), data)
