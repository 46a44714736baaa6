"""Signals at chosen moments: while a ``.pt`` / ``.safetensors`` output is being written (a real signal sent from
inside the zip writer), and during the command's start-up (sent from an import hook when a given module has been
imported). Each ends in exit 130 / 143, one line, and nothing left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import snapshot
from tests.hostile.corpus import Workspace, small_state

SOUPKIT = Path(sys.executable).with_name("soupkit")


# --- interrupted .pt writes ----------------------------------------------------------------------------------------


class _SignalOnWrite:
    """A file whose first write past ``after`` bytes sends this process ``signum`` (a real signal, as Ctrl-C or
    `kill` would): the handler runs inside torch.save's zip writer."""

    def __init__(self, handle, signum: int, after: int):
        self._handle, self._signum, self._left = handle, signum, after

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self._left is not None and size > self._left:
            self._left = None
            os.kill(os.getpid(), self._signum)  # the handler records it at the next bytecode boundary, here
        elif self._left is not None:
            self._left -= size
        return self._handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def test_an_ignored_sigint_stays_ignored(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """A background job of a script (``soupkit merge ... &``, ``nohup``) starts with SIGINT ignored, so that a
    Ctrl-C meant for the foreground does not kill it: soupkit keeps it so, as Python itself does, and the merge
    completes."""
    from soupkit.io import atomic

    w = Workspace(tmp_path)
    a, b = w.good("a.safetensors", 1), w.good("b.safetensors", 2)
    original = atomic.OutputSet.open
    monkeypatch.setattr(atomic.OutputSet, "open",
                        lambda self, path: _SignalOnWrite(original(self, path), signal.SIGINT, 0))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = cli("merge", a, b, "-o", tmp_path / "soup.safetensors")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # and left as it was found
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.code == 0, result.err
    assert (tmp_path / "soup.safetensors").is_file()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                       (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("after", [0, 3000])
def test_signal_while_writing_leaves_one_line_and_nothing_behind(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch,
                                                                 suffix: str, signum: int, code: int, word: str,
                                                                 after: int) -> None:
    from soupkit.io import atomic

    w = Workspace(tmp_path)
    state = {**small_state(1), "big": torch.randn(20_000)}
    a = w.good("a.safetensors", state=state)
    b = w.good("b.safetensors", state={k: v + 1 if v.is_floating_point() else v for k, v in state.items()})
    original = atomic.OutputSet.open
    monkeypatch.setattr(atomic.OutputSet, "open",
                        lambda self, path: _SignalOnWrite(original(self, path), signum, after))
    previous = signal.getsignal(signal.SIGTERM)
    before = snapshot(tmp_path)
    try:
        result = cli("merge", a, b, "-o", tmp_path / f"soup{suffix}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.code == code, result.err
    assert result.err.strip() == f"soupkit merge: {word}", result.err
    assert snapshot(tmp_path) == before


#: sent into a soupkit process through PYTHONPATH: an audit hook that signals the process itself when the named
#: module starts importing (once), and leaves a marker so the test knows the moment came
_SITECUSTOMIZE = """
import os, signal, sys
_target, _marker = os.environ["SOUPKIT_TEST_SIGNAL_AT"], os.environ["SOUPKIT_TEST_MARKER"]
_signum = int(os.environ["SOUPKIT_TEST_SIGNUM"])
def _hook(event, args):
    global _target
    if event == "import" and _target and args[0] == _target:
        _target = None
        open(_marker, "w").close()
        os.kill(os.getpid(), _signum)
sys.addaudithook(_hook)
"""

#: moments of the console script's start-up, each the start of one import: the CLI's first modules, typer (a few
#: hundred ms), the commands' modules, then the command itself (rich's tables, torch)
START_UP_MOMENTS = ["soupkit.errors", "soupkit.registry", "typer", "soupkit.interrupt", "soupkit.cli.merge_cmd",
                    "soupkit.report.html", "rich.table", "torch"]


@pytest.mark.skipif(not SOUPKIT.exists(), reason="the soupkit console script is not installed beside python")
@pytest.mark.parametrize("module", START_UP_MOMENTS)
@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted")])
def test_ctrl_c_during_start_up_prints_one_line(tmp_path: Path, module: str, signum: int, code: int,
                                                word: str) -> None:
    """Ctrl-C at each moment of start-up, from the CLI's first import on: exit 130, one line, never a traceback.
    (A signal before ``soupkit.cli`` starts, in the interpreter's own start-up, is Python's to handle.)"""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    checkpoint = Workspace(tmp_path).good("a.safetensors", 1)
    marker = tmp_path / "signalled"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(Path.cwd())]),
           "SOUPKIT_TEST_SIGNAL_AT": module, "SOUPKIT_TEST_MARKER": str(marker), "SOUPKIT_TEST_SIGNUM": str(signum)}
    process = subprocess.run([str(SOUPKIT), "inspect", str(checkpoint)], env=env, capture_output=True, text=True,
                             timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert marker.exists(), f"{module} was never imported: the moment did not come"
    assert "Traceback" not in process.stderr, process.stderr
    assert process.returncode == code, (process.returncode, process.stderr)
    assert process.stderr.strip() in (f"soupkit: {word}", f"soupkit inspect: {word}"), process.stderr
