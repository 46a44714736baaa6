"""Safe outputs: validate output paths before any work, write to temporary files, publish atomically.

A merge's outputs (one file, several shards + an index, or one file per WiSE-FT alpha) are written to hidden
temporary files in the target directory (``.<name>.<pid>-<hex>.soupkit-tmp``), flushed and fsync'ed, and only
then renamed into place together; a folder output is built in a staging folder beside its name and published by
one rename. Each output is locked (``OutputLock``) so two processes never both write it; an output never lands
over one that appeared meanwhile unless ``--force`` asked for it; inputs found changed before publishing stop it.
An error, Ctrl-C, SIGTERM or a full disk leaves no partial output and no temporary file behind; a SIGKILL leaves
only temporaries, which the next run beside them removes once their pid is gone.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from soupkit import interrupt
from soupkit.errors import CheckpointError, OutputError

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
_LOCK_SUFFIX = ".soupkit-lock"
_TEMP_NAME = re.compile(r"\.(\d+)-[0-9a-f]{8}\.soupkit-tmp$")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _check_name(out: Path) -> None:
    """A component longer than the file system allows fails at open() with a raw ENAMETOOLONG; say so first."""
    for part in out.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise OutputError(f"{out}: a file or folder name in the output path is {size} bytes long; file "
                              f"systems allow at most {NAME_MAX}")


def _temporary(target: Path) -> Path:
    """A hidden temporary next to ``target``, ``.<name>.<pid>-<hex>.soupkit-tmp``: the pid lets a later run tell a
    killed run's leftovers (removed) from a live one's; the name is shortened where it would pass NAME_MAX."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
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


def check_interrupt() -> None:
    """Where a long publication (a folder of thousands of files) lets a recorded Ctrl-C / SIGTERM stop it between
    files (``soupkit.interrupt``); the ``OutputSet`` then removes its temporaries."""
    interrupt.check()


# ---------------------------------------------------------------------------------------------- locks


def _lock_path(target: Path) -> Path:
    name = f".{target.name}{_LOCK_SUFFIX}"
    if len(os.fsencode(name)) > NAME_MAX:
        name = f".soupkit-{hashlib.sha1(os.fsencode(target.name)).hexdigest()[:16]}{_LOCK_SUFFIX}"
    return target.parent / name


class OutputLock:
    """An exclusive ``flock`` on ``.<name>.soupkit-lock`` beside an output, held from the first temporary to the
    publication: a second process writing the same output fails at once in one line instead of both "winning".
    The lock file is removed on release (under the lock; a taker checks it still holds the file's current inode,
    so removal never lets two processes in). A killed process's lock is released by the kernel; its file is
    reused by the next run."""

    def __init__(self, target: Path):
        self.target = target
        self.path = _lock_path(target)
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise OutputError(f"{target}: cannot create the lock file {self.path.name}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{target}: another process is writing this output right now (lock "
                                  f"{self.path.name}); wait for it to finish or choose another output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)  # the holder removed the file as we opened it: take the new one
        raise OutputError(f"{target}: cannot take the output lock {self.path.name}")

    def release(self) -> None:
        if self._fd >= 0:
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1


def _pid_of(name: str) -> int | None:
    """The pid a temporary's name carries (``.<target>.<pid>-<hex>.soupkit-tmp``), or None for another name."""
    match = _TEMP_NAME.search(name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the temporaries a killed run left beside ``target`` (files or staging folders whose name carries a
    pid that is no longer running); call with ``target``'s lock held. Returns what was removed."""
    prefixes = (f".{target.name}.", ".soupkit.")
    removed = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefixes) or not name.endswith(_TMP_SUFFIX):
            continue
        pid = _pid_of(name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        _remove(target.parent / name)
        removed.append(target.parent / name)
    return removed


def _remove(path: Path) -> None:
    """Delete a file, link or folder (a folder's links are removed, never followed)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- publishing

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_renameat2: Any = None


def _rename2(source: Path, target: Path, flags: int) -> bool:
    """Linux ``renameat2``: True when done, False where the kernel or libc lacks it; OSError otherwise."""
    global _renameat2
    if sys.platform != "linux":
        return False
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _renameat2 = libc.renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (AttributeError, OSError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), flags) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL):  # no renameat2, or a file system without these flags
        return False
    raise OSError(error, os.strerror(error), str(target))


def _deliver(taken: dict[int, object]) -> None:
    """Put back the dispositions ``interrupt.install`` replaced for the renames, then raise a signal recorded
    meanwhile as they would have (``KeyboardInterrupt`` for SIGINT)."""
    if not taken:
        return
    signum = interrupt.pending()
    interrupt.restore(taken)
    if signum is not None:
        interrupt.clear()
        signal.raise_signal(signum)


def _publish_file(tmp: Path, target: Path, replace: bool) -> None:
    """Rename ``tmp`` to ``target``; without ``replace`` never over a file that appeared meanwhile."""
    if replace:
        os.replace(tmp, target)
        return
    if _rename2(tmp, target, _RENAME_NOREPLACE):
        return
    os.link(tmp, target)  # fails with EEXIST where the target appeared: the no-replace rename of older kernels
    os.unlink(tmp)


@dataclass
class _Folder:
    """A folder output being built in ``staging`` beside ``target``."""

    target: Path
    staging: Path
    lock: OutputLock | None


class OutputSet:
    """A group of outputs published together, each under an exclusive lock (``OutputLock``).

    ``open(path)`` returns a binary file on a temporary name next to ``path`` (``.<name>.<pid>-<hex>.soupkit-tmp``).
    ``folder(path)`` declares a folder output: files opened under it are written into a staging folder beside it,
    which is published by ONE rename (nothing of it appears before, all of it after). ``commit()`` fsyncs
    everything, renames the files into place (shards first, an index last, with no interruption check between those
    renames) and then the folders; ``abort()`` (or leaving the ``with`` block by an exception, Ctrl-C included)
    deletes every temporary. ``replace=False`` (no ``--force``) never publishes over an output that appeared while
    this one was written. OS errors while writing become one-line ``OutputError``s.
    """

    def __init__(self, *, replace: bool = True, exclusive: bool = True, output: bool = True) -> None:
        self.replace = replace
        #: a command's output (not a report or cache entry): publishing it marks the command done
        #: (``interrupt.published``), so a signal after that no longer turns a written output into exit 130
        self._output = output
        #: lock each output (``OutputLock``); off for small files where the last writer may win (cache entries,
        #: reports), so that processes sharing a cache never fail on each other
        self.exclusive = exclusive
        self._files: list[tuple[Path, Path, BinaryIO]] = []
        self._made_dirs: list[Path] = []
        self._folders: list[_Folder] = []
        self._locks: dict[Path, OutputLock] = {}
        self._watched: dict[Path, tuple[int, int, int]] = {}

    def watch(self, inputs: Iterable[str | Path]) -> None:
        """Record the inputs' size, mtime and inode now; ``commit`` refuses to publish when one has changed (an
        input rewritten while it was merged), naming it."""
        for path in inputs:
            try:
                st = os.stat(path)
            except OSError:
                continue
            self._watched[Path(path)] = (st.st_size, st.st_mtime_ns, st.st_ino)

    def _check_inputs(self) -> None:
        for path, before in self._watched.items():
            try:
                st = os.stat(path)
                now = (st.st_size, st.st_mtime_ns, st.st_ino)
            except OSError:
                now = None
            if now != before:
                what = "was removed" if now is None else "was modified"
                raise CheckpointError(f"{path}: input {what} while it was being merged; the output was not "
                                      f"written (merge again once the input is complete)")

    def _make_parents(self, directory: Path) -> None:
        missing = []
        parent = directory.absolute()
        while not parent.exists() and not parent.is_symlink():
            missing.append(parent)
            parent = parent.parent
        for made in reversed(missing):
            try:
                made.mkdir()
            except FileExistsError:
                if made.is_dir():
                    continue  # another writer made it meanwhile: not ours to remove
                raise OutputError(f"{made}: cannot create output folder: a file of that name appeared") from None
            except OSError as err:
                raise OutputError(f"{made}: cannot create output folder: {err.strerror}") from None
            self._made_dirs.append(made)

    def lock(self, path: str | Path) -> None:
        """Hold ``path``'s output lock until the set is published or aborted, for an output written under other
        names (a sharded ``soup.safetensors`` is written as shards + index)."""
        target = Path(path)
        if any(target.is_relative_to(known.target) for known in self._folders):
            return  # inside a folder output: its folder's lock covers it
        self._make_parents(target.parent)
        self._lock(target)

    def _lock(self, target: Path) -> OutputLock | None:
        if not self.exclusive:
            return None
        key = target.absolute()
        if key not in self._locks:
            self._locks[key] = OutputLock(target)
            remove_stale_temporaries(target)
        return self._locks[key]

    def folder(self, path: str | Path) -> Path:
        """Declare ``path`` a folder output: returns the staging folder that files opened under it go to."""
        target = Path(path)
        for known in self._folders:
            if known.target == target:
                return known.staging
        self._make_parents(target.parent)
        lock = self._lock(target)
        staging = _temporary(target)
        try:
            staging.mkdir()
        except OSError as err:
            raise OutputError(f"{target}: cannot create output folder: {err.strerror}") from None
        self._folders.append(_Folder(target, staging, lock))
        return staging

    def _staged(self, target: Path) -> Path | None:
        for known in self._folders:
            try:
                relative = target.relative_to(known.target)
            except ValueError:
                continue
            staged = known.staging / relative
            staged.parent.mkdir(parents=True, exist_ok=True)
            return staged
        return None

    def open(self, path: str | Path) -> BinaryIO:
        target = Path(path)
        tmp = self._staged(target)
        if tmp is None:
            self._make_parents(target.parent)
            self._lock(target)
            tmp = _temporary(target)
        try:
            handle = open(tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        except OSError as err:
            raise OutputError(f"{target}: cannot create output: {err.strerror}") from None
        self._files.append((target, tmp, handle))
        return handle

    @property
    def temporary_paths(self) -> list[Path]:
        return [tmp for _, tmp, _ in self._files] + [f.staging for f in self._folders]

    def commit(self) -> list[Path]:
        try:
            for _, _, handle in self._files:
                check_interrupt()  # fsync can take a while on a busy disk: a signal stops the commit here...
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            for known in self._folders:
                _fsync_tree(known.staging)
            self._check_inputs()
            check_interrupt()  # ...or here, the last moment before the outputs are published
        except OSError as err:
            target = next((t for t, _, h in self._files if not h.closed), self._files[-1][0] if self._files
                          else self._folders[0].target)
            self.abort()
            raise OutputError(f"{target}: cannot write output: {err.strerror}") from None
        except BaseException:
            self.abort()
            raise
        loose = [(t, tmp) for t, tmp, _ in self._files if not any(tmp.is_relative_to(f.staging) for f in
                                                                  self._folders)]
        published: list[Path] = []
        # no check between the renames: a signal is only recorded (soupkit.interrupt) until they are done; where
        # nothing recorded signals before (a bare library call), this does for the renames, then delivers it
        taken = interrupt.install() if threading.current_thread() is threading.main_thread() else {}
        try:
            for target, tmp in loose:  # in open order: shards before their index
                _publish_file(tmp, target, self.replace)
                published.append(target)
            for known in self._folders:
                self._publish_folder(known)
                published.append(known.target)
        except OSError as err:
            failed = next((t for t, _ in loose if t not in published), None) or next(
                (f.target for f in self._folders if f.target not in published), Path("output"))
            for target in published:
                if target in {t for t, _ in loose}:
                    _remove(target)  # all or nothing: the files this commit published go again
            self.abort()
            _deliver(taken)
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputError(f"{failed}: output appeared while this one was written (another process?); "
                                  f"nothing was published; use --force to replace it") from None
            raise OutputError(f"{failed}: cannot publish output: {err.strerror}") from None
        if self._output:
            interrupt.published()
        for directory in {t.parent.absolute() for t in published}:
            _fsync_dir(directory)
        self._files = []
        self._folders = []
        self._made_dirs = []
        self._release()
        _deliver(taken)  # a Ctrl-C during the renames of a bare library call acts now, on whole outputs
        return published

    def _publish_folder(self, known: _Folder) -> None:
        """One rename: into a free name (``RENAME_NOREPLACE``); over an empty folder; or, with ``replace``, swapped
        with the old folder in one ``RENAME_EXCHANGE`` (two renames where the kernel lacks it), the old one then
        removed."""
        target, staging = known.target, known.staging
        if not os.path.lexists(target):
            if not _rename2(staging, target, _RENAME_NOREPLACE):
                os.rename(staging, target)  # fails over a non-empty folder that appeared meanwhile
            return
        if target.is_dir() and not target.is_symlink() and not any(os.scandir(target)):
            os.rename(staging, target)  # over an empty folder: rename(2) replaces it in one step
            return
        if not self.replace:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        if _rename2(staging, target, _RENAME_EXCHANGE):
            _remove(staging)  # now the old folder
            return
        aside = _temporary(target)
        os.rename(target, aside)
        os.rename(staging, target)
        _remove(aside)

    def _release(self) -> None:
        for lock in self._locks.values():
            lock.release()
        self._locks = {}

    def abort(self) -> None:
        for _, tmp, handle in self._files:
            try:
                handle.close()
            except OSError:
                pass
            try:
                tmp.unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass
        self._files = []
        for known in self._folders:
            _remove(known.staging)
        self._folders = []
        self._release()  # the lock files first: they sit in the folders made for the outputs
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
            target = self._files[-1][0] if self._files else self._folders[0].target if self._folders else "output"
            self.abort()
            full = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
            if isinstance(exc, OSError) and exc.errno in full:
                raise OutputError(f"{target}: cannot write output: {exc.strerror}") from None
        elif self._files or self._folders:
            self.commit()
        else:
            self._release()


def _fsync_tree(folder: Path) -> None:
    """fsync a staging folder's subfolders and itself (its files were fsync'ed as they were closed)."""
    for directory, _, _ in os.walk(folder, topdown=False):
        _fsync_dir(Path(directory))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a small file (a report, a plot, a cache entry) atomically: a temporary file beside ``path``
    (missing folders created), fsync'ed, then renamed over it, so a reader never sees half a file and a crash
    leaves the old one. OS errors become one-line ``OutputError``s naming ``path``."""
    target = Path(path)
    try:
        with OutputSet(exclusive=False, output=False) as outputs:
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
