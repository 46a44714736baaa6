"""A worker process for ``test_interrupt.py``: runs real ``soupkit merge`` commands one after another, through
the CLI's own entry point (``soupkit.cli.main``, exit codes and stderr lines as a user sees them), while the test
process signals it at random moments, and reports each run's outcome as one JSON line.

Protocol (one line each way per run, so that every signal is matched with the run it was sent into):
  test -> worker  ``{"args": [...], "signal": 2 | 15 | 0}``
  worker -> test  ``started``                       just before the command starts
  test -> worker  ``sent``                          after the test's ``os.kill`` returned (for signal 0: at once)
  worker -> test  ``{"code": .., "stderr": .., "late": .., "published": ..}``

``late`` is true when the signal was recorded after the run had published its output (or returned): from there
a run finishes and exits 0, so that delivery did not land inside the merge, and the test does not count it.
``published`` is how many seconds into the run its output was in place (None if it never was): the test sends
its signals inside that window. One process runs them all because importing torch and
soupkit takes seconds here, while a merge of the test's inputs takes tens of milliseconds; everything under test
(the signal handlers, the engine's checks, the writers' cleanup, the exit codes) is per run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
import time

import typer

from soupkit import interrupt
from soupkit.cli import main


def _recorded() -> bool:
    """Whether a signal is recorded and unanswered. The handler runs at the next bytecode boundary after the
    signal's delivery (which the ``sent`` line guarantees): the loop gives it those boundaries."""
    for _ in range(3):
        pass
    return interrupt.pending() is not None


def _serve() -> None:
    # building typer's click command from the app takes ~0.1 s per call: built once, as a console script would
    typer.main.get_command = functools.lru_cache(maxsize=None)(typer.main.get_command)
    interrupt.install()  # the worker records signals between runs too, so none is lost or answered twice
    published: list[float] = []
    mark = interrupt.published

    def timed_mark() -> None:
        published.append(time.monotonic())
        mark()

    interrupt.published = timed_mark  # OutputSet.commit calls it through the module
    for line in sys.stdin:
        request = json.loads(line)
        interrupt.clear()
        err, out = io.StringIO(), io.StringIO()
        published.clear()
        print("started", flush=True)
        started = time.monotonic()
        code = 0
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                main(request["args"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        sys.stdin.readline()  # "sent": the signal has been delivered to this process
        late = _recorded()
        interrupt.clear()
        print(json.dumps({"code": code, "stderr": err.getvalue(), "late": late,
                          "published": published[0] - started if published else None}), flush=True)


if __name__ == "__main__":
    _serve()
