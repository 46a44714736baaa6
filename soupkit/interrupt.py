"""Cooperative interruption: a signal handler only records SIGINT / SIGTERM; the code doing the work calls
``check()`` between its steps and raises from its own frame.

Why: Python runs a signal handler at whatever bytecode the main thread is at. A handler that raises there can
land inside a ``weakref.finalize`` callback or a ``__del__``, where Python prints "Exception ignored" and drops
it, and the merge then finishes, exits 0 and publishes its output (the engine's buffer pool met this in about
half of all Ctrl-Cs). Recording is always safe; raising is left to the loops that know they can stop: the
merge engine's steps, the readers' and writers' loops, the soups' candidates and the evaluator's batches, and
last ``OutputSet.commit``, so that a signal that arrives before the outputs are published always stops them.

This module sits at the bottom of the layers (beside ``errors``): it imports nothing of soupkit's.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

__all__ = ["Interrupted", "Stopped", "Terminated", "check", "clear", "cooperative", "install", "pending", "published",
           "raised", "restore"]


class Stopped(BaseException):
    """A recorded signal, raised by ``check()``: a ``BaseException`` (as ``SystemExit`` is), so every ``finally``
    and ``except BaseException`` cleanup (temporary files) runs and no ``except Exception`` swallows it."""

    signum: int = signal.SIGINT
    word = "interrupted"

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.signum)


class Interrupted(Stopped, KeyboardInterrupt):
    """A recorded SIGINT (Ctrl-C): a ``KeyboardInterrupt``, as Python's own handler would raise."""


class Terminated(Stopped):
    """A recorded SIGTERM (a scheduler or ``kill`` stopping the run). Not a ``KeyboardInterrupt``: a script's
    ``except KeyboardInterrupt`` is for Ctrl-C and must not swallow a termination."""

    signum = signal.SIGTERM
    word = "terminated"


_RAISES = {signal.SIGINT: Interrupted, signal.SIGTERM: Terminated}

#: the recorded signal, or None; a plain global read is all ``check()`` costs (it runs once per merge step)
_pending: int | None = None
_raised: int | None = None  # the last signal ``check()`` raised (what a CLI run exits by, once caught)
_published = False  # this run's outputs are in place: from here on it finishes (see ``published``)


def _record(signum: int, frame: FrameType | None) -> None:
    """The signal handler: record, never raise (it may run inside a finaliser). A second signal while the first
    is still unanswered means the user insists: it raises here, as Python's own handler would."""
    global _pending, _raised
    if _pending is not None:
        _pending, _raised = None, signum
        raise _RAISES[signum]()
    _pending = signum


def pending() -> int | None:
    """The recorded signal number, if one arrived and no ``check()`` has raised it yet."""
    return _pending


def check() -> None:
    """Raise the recorded signal as ``Interrupted`` / ``Terminated`` (once: the exception carries it from here
    on, so cleanup code that calls ``check()`` again is not interrupted a second time)."""
    global _pending, _raised
    signum = _pending
    if signum is not None and not _published:
        _pending, _raised = None, signum
        raise _RAISES[signum]()


def published() -> None:
    """Called once a run's output is in place (``OutputSet.commit``). A signal from then on does not stop the
    run: its output is complete, and stopping it now would leave an output behind an "interrupted" exit; what
    remains (reports, a summary) is short, and the run exits 0. So an exit of 130 / 143 always means that
    nothing was written under the output's name."""
    global _published
    _published = True


def raised() -> int | None:
    """The signal the last ``check()`` raised (None when none did since ``clear()``)."""
    return _raised


def clear(*, pending: bool = True) -> None:
    """Start a new run: forget the last raised signal, that outputs were published, and, with ``pending``, a
    recorded signal not yet raised."""
    global _pending, _raised, _published
    _raised, _published = None, False
    if pending:
        _pending = None


def _takes_over(signum: int) -> bool:
    """Only Python's own dispositions are replaced: an ignored SIGINT (a job started in the background by a
    non-interactive shell) stays ignored, and an application's own handler is left alone."""
    current = signal.getsignal(signum)
    return current is _record or current in (signal.default_int_handler, signal.SIG_DFL, None)


def install() -> dict[int, object]:
    """Record SIGINT and SIGTERM from now on (the CLI calls this once per run; main thread only). Returns the
    dispositions it replaced, for ``restore``."""
    replaced = {}
    for signum in _RAISES:
        if _takes_over(signum) and signal.getsignal(signum) is not _record:
            replaced[signum] = signal.getsignal(signum)
            signal.signal(signum, _record)
    return replaced


def restore(replaced: dict[int, object]) -> None:
    """Put back the dispositions ``install`` replaced."""
    for signum, previous in replaced.items():
        signal.signal(signum, previous)  # type: ignore[arg-type]


@contextmanager
def cooperative() -> Iterator[None]:
    """Library calls that write outputs (merges, soups) run inside this: SIGINT / SIGTERM are recorded while it
    lasts (where they still have Python's default disposition and this is the main thread), and answered as the
    program would have answered them without soupkit, only from a frame that can stop: SIGINT raises
    ``KeyboardInterrupt`` (``Interrupted``); a default SIGTERM raises ``Terminated`` and, if nothing catches
    it, ends the process by SIGTERM (exit status 143) once the stack has unwound and every ``with`` block has
    removed its temporary files. Nested uses and a CLI run (which installs the handlers itself) change nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    taken = install()
    if taken:
        clear(pending=False)  # the outermost call is one run
    if signal.SIGTERM in taken:
        _hook_uncaught_terminated()
    try:
        yield
        if taken:
            check()  # a signal after the last step's check and before any output was published
    finally:
        restore(taken)


def _hook_uncaught_terminated() -> None:
    """An uncaught ``Terminated`` ends the process by SIGTERM, as the signal itself would have (Python would
    treat the ``KeyboardInterrupt`` it is as a SIGINT, exit 130). ``sys.excepthook`` runs after the stack has
    unwound, so temporary files are gone by then; the hook is installed once and passes anything else on."""
    previous = sys.excepthook
    if getattr(previous, "_soupkit_terminated", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if isinstance(value, Terminated) and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os.kill(os.getpid(), signal.SIGTERM)
        previous(kind, value, tb)

    hook._soupkit_terminated = True  # type: ignore[attr-defined]
    sys.excepthook = hook
