"""Signals at chosen moments: while a ``.pt`` / ``.safetensors`` output is being written (a real signal sent from
inside the zip writer), and during the command's start-up (sent from an import hook when a given module has been
imported). Each ends in exit 130 / 143, one line, and nothing left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


@pytest.mark.skipif(not SOUPKIT.exists(), reason="the soupkit console script is not installed beside python")
def test_ctrl_c_during_start_up_prints_one_line(tmp_path: Path) -> None:
    """SIGINT at several moments of start-up (imports of typer and rich; then the command): never a traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    for delay in (0.15, 0.3, 0.6):
        process = subprocess.Popen([str(SOUPKIT), "inspect", str(tmp_path / "none.safetensors")], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        if process.returncode == 130:
            assert err.strip() in ("soupkit: interrupted", "soupkit inspect: interrupted"), err
        else:  # it had already finished: the missing file's one line
            assert process.returncode == 2 and len(err.strip().splitlines()) == 1, err
