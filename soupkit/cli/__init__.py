"""Command-line interface: a thin shell over the library (every command is one library call).

``main()`` turns user errors into one line on stderr and exit code 2, with no traceback. Ctrl-C and SIGTERM are
recorded (``soupkit.interrupt``) and raised by the work's own loops at their next step, so temporary files are
removed on the way out; the run then exits 130 / 143 with one line.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_at_start(signum: int, frame: object) -> None:
    """Ctrl-C while the CLI is still importing (typer, rich: a few hundred ms): one line, no traceback. Nothing
    has been opened or written yet, so there is nothing to unwind; ``main()`` restores Python's handler."""
    os.write(2, b"soupkit: interrupted\n")
    os._exit(130)


# installed first thing, and only when this process is the soupkit command (never for a library import)
_COMMAND = os.path.basename(sys.argv[0]) == "soupkit" or sys.argv[0].endswith(os.path.join("soupkit", "__main__.py"))
if _COMMAND and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_at_start)

import errno  # noqa: E402 - after the handler, so Ctrl-C during these imports is quiet
import warnings  # noqa: E402

import typer  # noqa: E402

from soupkit import interrupt  # noqa: E402
from soupkit.errors import SoupkitError  # noqa: E402
from soupkit.registry import PluginWarning  # noqa: E402

# Each import registers that module's commands on `app`; building the merge flags loads method plugins, whose
# failures are warnings shown by main() as one line each
with warnings.catch_warnings(record=True) as _import_warnings:
    warnings.simplefilter("always")
    from soupkit.cli import (  # noqa: F401
        demo_cmd,
        doctor_cmd,
        eval_cmd,
        extract_cmd,
        fisher_cmd,
        inspect_cmd,
        merge_cmd,
        report_cmd,
        search_cmd,
    )
from soupkit.cli._app import app  # noqa: E402
from soupkit.cli._help import tidy  # noqa: E402
from soupkit.options import cli_names  # noqa: E402
from soupkit.report import html as report_html  # noqa: E402

__all__ = ["app", "main"]

try:  # typer >= 0.20 vendors click; older releases use the click package itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors


def _plugin_warnings() -> list[warnings.WarningMessage]:
    """The plugin warnings raised while the commands were built (shown once, by the first ``main()``)."""

    found = [w for w in _import_warnings if issubclass(w.category, PluginWarning)]
    _import_warnings.clear()
    return found


def _prog(args: list[str]) -> str:
    sub = next((a for a in args if not a.startswith("-")), None)
    return f"soupkit {sub}" if sub else "soupkit"


def _one_line(message: str) -> str:
    """Control characters (a newline in a file or tensor name) escaped, so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _prepare_process(*, standalone: bool) -> dict[int, object]:
    """Signals and streams for a CLI run: Ctrl-C and SIGTERM are recorded and stop the work at its next step
    (temporary files are removed), a closed pipe (``soupkit --help | head``) stops quietly as Unix tools do, odd
    names print escaped."""
    # an earlier in-process run's SIGTERM must not turn this run's Ctrl-C into "terminated"; a signal recorded
    # but not yet answered stays: it was sent to stop this process
    interrupt.clear(pending=False)
    if hasattr(sys.stdout, "reconfigure"):  # a tensor name from a pickle may hold a lone surrogate: print it escaped
        sys.stdout.reconfigure(errors="backslashreplace")
    if signal.getsignal(signal.SIGINT) is _interrupted_at_start:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # so that install() takes it over
    replaced = interrupt.install()
    if hasattr(signal, "SIGPIPE") and standalone:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return replaced


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``soupkit`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    replaced = _prepare_process(standalone=argv is None)
    try:
        _run(args)
    finally:
        if argv is not None:  # called in-process (tests, a notebook): Ctrl-C is Python's again afterwards
            interrupt.restore(replaced)


def _run(args: list[str]) -> None:
    report_html.INVOCATION = ["soupkit", *args]  # soup records keep the command that made them

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        # one line per warning, like errors; library code raises them with warnings.warn
        print(f"{_prog(args)}: warning: {_one_line(str(message))}", file=sys.stderr)

    try:
        with warnings.catch_warnings(), cli_names():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=ResourceWarning)
            warnings.showwarning = show_warning
            for caught in _plugin_warnings():
                show_warning(caught.message, caught.category, caught.filename, caught.lineno)
            # non-standalone typer returns the exit code of Exit (and of Ctrl-C: 130) instead of raising
            code = tidy(typer.main.get_command(app)).main(args=args, prog_name="soupkit", standalone_mode=False)
            if code == 130:  # typer turns the KeyboardInterrupt (Interrupted / Terminated) into Exit(130)
                raise interrupt.Terminated() if interrupt.raised() == signal.SIGTERM else interrupt.Interrupted()
            interrupt.check()  # a signal that came after the work's last check is still answered
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except SoupkitError as err:
        print(f"{_prog(args)}: error: {_one_line(str(err))}", file=sys.stderr)
        sys.exit(err.exit_code)
    except click_errors.NoArgsIsHelpError:
        sys.exit(0)
    except click_errors.UsageError as err:
        # one line instead of click's usage box; still names the option at fault
        print(f"{_prog(args)}: error: {_one_line(err.format_message())} (see --help)", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print(f"{_prog(args)}: interrupted", file=sys.stderr)
        sys.exit(130)
    except interrupt.Stopped as stop:
        print(f"{_prog(args)}: {stop.word}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C, raised by the handler wherever it ran
        stop = interrupt.Terminated() if interrupt.raised() == signal.SIGTERM else interrupt.Interrupted()
        print(f"{_prog(args)}: {stop.word}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except click_errors.ClickException as err:
        print(f"{_prog(args)}: error: {_one_line(err.format_message())}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        # a path the user typed that no file system accepts (a name over 255 bytes, a symlink loop), met by a
        # pathlib check somewhere before the code that would have named it: still one line naming the path
        if err.errno not in (errno.ENAMETOOLONG, errno.ELOOP) or err.filename is None:
            raise
        print(f"{_prog(args)}: error: {_one_line(str(err.filename))}: {err.strerror}", file=sys.stderr)
        sys.exit(2)
    finally:
        report_html.INVOCATION = None  # in-process callers (tests, notebooks) must not inherit it
