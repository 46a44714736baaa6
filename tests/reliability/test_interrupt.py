"""Interrupting a merge never leaves a partial output or a temporary file, and never touches an input.

A real ``soupkit merge`` runs on inputs big enough to still be writing when it is signalled (4 x 150 MB); the
test waits until the hidden temporary output has data in it, then sends SIGINT (exit 130) or SIGTERM (exit 143).
A full disk is simulated in-process and, where this process may mount one, reproduced on a real 1 MB tmpfs.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import snapshot
from tests.reliability.corpus import Workspace, small_state

SOUPKIT = Path(sys.executable).with_name("soupkit")
BIG_ELEMENTS = 150_000_000 // 4  # 150 MB of float32 per input


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    import soupkit

    folder = tmp_path_factory.mktemp("big")
    paths = []
    for number in range(4):
        state = {"big.weight": torch.empty(BIG_ELEMENTS).uniform_(), "small.bias": torch.ones(8)}
        paths.append(soupkit.save_checkpoint(state, folder / f"in{number}.safetensors"))
        del state
    return paths


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.soupkit-tmp"))


@pytest.mark.slow
@pytest.mark.skipif(not SOUPKIT.exists(), reason="the soupkit console script is not installed beside python")
@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                       (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])  # .pt: torch.save's zip writer is interrupted
def test_signal_mid_write_leaves_nothing(big_inputs: list[Path], tmp_path: Path, signum: int, code: int,
                                         word: str, suffix: str) -> None:
    inputs_before = snapshot(big_inputs[0].parent)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / f"soup{suffix}"
    for _attempt in range(5):  # a busy machine can let a whole merge finish between two polls: try again
        # the child gets default signal dispositions: a run started in the background by a non-interactive shell
        # (`pytest &`) inherits an ignored SIGINT, which Python and so soupkit rightly keep ignoring
        process = subprocess.Popen([str(SOUPKIT), "merge", *map(str, big_inputs), "-o", str(output), "--quiet",
                                    "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=_default_signals)
        try:
            deadline = time.monotonic() + 60
            written = 0
            while time.monotonic() < deadline and process.poll() is None:
                found = temporaries(out_dir)
                written = found[0].stat().st_size if found else 0
                if written > 4 << 20:  # past the header: tensor data is streaming in
                    break
                time.sleep(0.002)
            # freeze it (at once, whatever the interpreter is doing), then check it is still mid-write
            process.send_signal(signal.SIGSTOP)
            still_writing = process.poll() is None and written > 4 << 20 and bool(temporaries(out_dir))
            if still_writing:
                process.send_signal(signum)  # stays pending until the process runs again
            process.send_signal(signal.SIGCONT)
            _, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if still_writing:
            break
        output.unlink(missing_ok=True)
    else:
        pytest.fail("the merge never stayed running long enough to be interrupted")
    assert process.returncode == code, err
    assert err.strip() == f"soupkit merge: {word}", err
    assert list(out_dir.iterdir()) == [], "an output or temporary file was left behind"
    assert snapshot(big_inputs[0].parent) == inputs_before


class _FullDisk:
    """A file object whose writes fail with ENOSPC once ``room`` bytes have been written."""

    def __init__(self, handle, room: int):
        self._handle, self._room = handle, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def pair(w: Workspace, elements: int) -> tuple[Path, Path]:
    """Two compatible inputs with a ``big`` tensor of ``elements`` float32 (integer tensors equal)."""
    state = {**small_state(1), "big": torch.randn(elements)}
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    return w.good("a.safetensors", state=state), w.good("b.safetensors", state=other)


@pytest.mark.parametrize(("suffix", "shard"), [(".safetensors", None), (".safetensors", "20KB"), (".pt", None)])
@pytest.mark.parametrize("room", [0, 8000])
def test_disk_full_simulated(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch, suffix: str, shard: str | None,
                             room: int) -> None:
    from soupkit.io import atomic

    a, b = pair(Workspace(tmp_path), 10_000)
    original = atomic.OutputSet.open
    monkeypatch.setattr(atomic.OutputSet, "open", lambda self, path: _FullDisk(original(self, path), room))
    before = snapshot(tmp_path)
    output = tmp_path / f"soup{suffix}"
    result = cli("merge", a, b, "-o", output, *(["--shard-size", shard] if shard else []))
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    # the file named is the output (or, sharded, the shard that did not fit)
    assert lines[0].startswith(f"soupkit merge: error: {tmp_path / 'soup'}"), lines[0]
    assert lines[0].endswith(": cannot write output: No space left on device"), lines[0]
    assert snapshot(tmp_path) == before


@pytest.fixture
def tiny_filesystem(tmp_path: Path):
    """A real 1 MB tmpfs (needs the right to mount; skipped where the process lacks it)."""
    target = tmp_path / "tiny"
    target.mkdir()
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)],
                                       capture_output=True).returncode != 0:
        pytest.skip("no right to mount a small tmpfs here; test_disk_full_simulated covers ENOSPC")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_disk_full_real(tmp_path: Path, cli, tiny_filesystem: Path, suffix: str) -> None:
    w = Workspace(tmp_path / "in")
    w.root.mkdir()
    a, b = pair(w, 300_000)  # 1.2 MB: cannot fit
    before = snapshot(w.root)
    output = tiny_filesystem / f"soup{suffix}"
    result = cli("merge", a, b, "-o", output)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    assert str(output) in lines[0] and "No space left on device" in lines[0], lines[0]
    assert list(tiny_filesystem.iterdir()) == []
    assert snapshot(w.root) == before
