"""Interrupting a merge never leaves a partial output or a temporary file, and never touches an input.

A real ``soupkit merge`` runs on inputs big enough to still be writing when it is signalled (4 x 150 MB); the
test waits until the hidden temporary output has data in it, then sends SIGINT (exit 130) or SIGTERM (exit 143).
A full disk is simulated in-process and, where this process may mount one, reproduced on a real 1 MB tmpfs.
"""

from __future__ import annotations

import errno
import math
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
from tests.hostile.corpus import Workspace, small_state

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


# ------------------------------------------------------------------------------- signals at random moments

DELIVERIES = 200  # per signal, spread evenly over the kinds of merge below
WORKER = Path(__file__).with_name("interrupt_worker.py")


def _random_signal_workspace(root: Path, cache: Path) -> dict[str, list[str]]:
    """Inputs for each kind of merge, and the command (``{out}``: the output folder of one run)."""
    import json

    from soupkit.demo_train import digits_cnn
    from soupkit.io import save_checkpoint

    files, folders, cnns = [], [], []
    for number in range(3):
        g = torch.Generator().manual_seed(number)
        # 12 tensors of 20,000 floats and an integer one: a few hundred KB per input, tens of engine steps
        state = {f"layer{j}.weight": torch.randn(20_000, generator=g) for j in range(12)}
        files.append(str(save_checkpoint({**state, "step": torch.tensor(3)}, root / f"in{number}.safetensors")))
        folder = root / f"folder{number}"
        folder.mkdir()
        save_checkpoint(state, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"architectures": ["TinyModel"], "model_type": "tiny"}))
        folders.append(str(folder))
        torch.manual_seed(number)
        cnns.append(str(save_checkpoint(digits_cnn().state_dict(), root / f"cnn{number}.safetensors")))
    digits = {"kind": "digits", "size": 16}
    # 5% of the digits held out (67 images) in batches of 8: a greedy soup scores in a few hundred ms, and
    # checks for a signal between batches
    recipe = {"model": {"kind": "python", "factory": "soupkit.demo_train:digits_cnn", "num_classes": 10},
              "data": {"heldout": {**digits, "split": "heldout", "holdout": 0.05},
                       "test": {"clean": {**digits, "split": "test"}}},
              "batch_size": 8, "device": "cpu", "precision": "fp32"}
    (root / "digits.json").write_text(json.dumps(recipe))  # JSON is YAML
    quiet = ["--quiet"]
    return {
        "file": ["merge", *files, "-o", "{out}/soup.safetensors", *quiet],
        "shards": ["merge", *files, "-o", "{out}/soup.safetensors", "--shard-size", "100KB", *quiet],
        "folder": ["merge", *folders, "-o", "{out}/soup/", *quiet],
        "pt": ["merge", *files, "-o", "{out}/soup.pt", *quiet],
        "greedy": ["merge", "-m", "greedy", *cnns, "--eval", str(root / "digits.json"), "--cache-dir",
                   str(cache), "-o", "{out}/soup.safetensors", *quiet],
    }


class _Worker:
    """The worker process of ``interrupt_worker.py``, one run at a time."""

    def __init__(self, log: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
               # one intra-op thread: on a busy 2-core machine torch's spinning threads made a forward pass of 8
               # digits take 100 ms instead of 1 ms (the greedy soups' scoring)
               "OMP_NUM_THREADS": "1"}
        self._log = log.open("w")
        self.process = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log, text=True, bufsize=1, env=env,
                                        preexec_fn=_default_signals)
        self.log = log

    def _line(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=60)
            pytest.fail(f"the worker died (status {self.process.returncode}): {self.log.read_text()[-3000:]}")
        return line

    def run(self, args: list[str], signum: int, delay: float) -> dict:
        """One command; ``signum`` (0: none) is sent ``delay`` seconds after it starts."""
        import json

        self.process.stdin.write(json.dumps({"args": args}) + "\n")
        assert self._line().strip() == "started"
        if signum:
            time.sleep(delay)
            os.kill(self.process.pid, signum)
        self.process.stdin.write("sent\n")
        return json.loads(self._line())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self._log.close()


def _deliver_all(worker: _Worker, commands: dict[str, list[str]], signum: int, outputs: Path, seed: int) -> int:
    """Send ``DELIVERIES`` of ``signum`` into runs of ``worker`` (each kind in turn, shuffled), checking each;
    returns how many landed inside a run."""
    import random

    rng = random.Random(seed)
    runs = 0

    def command(kind: str) -> tuple[list[str], Path]:
        nonlocal runs
        runs += 1
        out = outputs / str(runs)
        out.mkdir(parents=True)
        return [a.replace("{out}", str(out)) for a in commands[kind]], out

    window: dict[str, float] = {}
    for kind in commands:  # a second, warm run of each kind: the time until its output is in place
        for attempt in range(2):
            args, out = command(kind)
            result = worker.run(args, 0, 0.0)
            assert result["code"] == 0 and result["published"] is not None, (kind, result)
            if attempt:  # the first run of a kind warms its caches
                window[kind] = min(window.get(kind, math.inf), result["published"])
            assert [p for p in out.iterdir() if p.name.startswith(".")] == []
            shutil.rmtree(out)
    plan = [kind for kind in commands for _ in range(DELIVERIES // len(commands))]
    rng.shuffle(plan)
    landed = late = 0
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    while plan:
        kind = plan.pop()
        args, out = command(kind)
        result = worker.run(args, signum, rng.uniform(0.0, window[kind]))
        where = f"{kind}, signal {signum}, seed {seed}: {result}"
        if result["late"]:  # the run had published before the signal came: its output is whole; try again
            assert result["code"] == 0, where
            assert [p for p in out.iterdir() if p.name.startswith(".")] == [], where
            late += 1
            assert late <= DELIVERIES, f"most signals arrived after the run had published ({where})"
            window[kind] *= 0.8  # this run was quicker than the window: the machine's load changed
            plan.insert(rng.randrange(len(plan) + 1), kind)
        else:
            assert result["code"] == 128 + signum, where
            assert result["stderr"] == f"soupkit merge: {word}\n", where
            assert list(out.iterdir()) == [], where
            landed += 1
        shutil.rmtree(out)
    return landed


@pytest.mark.slow
def test_signals_at_random_moments_of_real_merges(tmp_path: Path) -> None:
    """200 SIGINTs and 200 SIGTERMs, each sent at a random moment of a real ``soupkit merge`` (a file, shards, an
    HF folder, a ``.pt``, a greedy soup): every one exits 130 / 143 with exactly one line on stderr and leaves
    nothing under the output's name (no output, shard, folder, report or temporary file); inputs are untouched.

    A signal is sent a uniform random time into a run, up to the moment that kind's output was published in a
    warm run; one that arrives after its run had published (``late``: from there a run finishes, exit 0) is
    checked (exit 0, no temporary left) but not counted, the run is repeated and that kind's window shrinks,
    so all 400 land inside a merge. SIGINTs and SIGTERMs go to two workers at once (the machine's two cores)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "in"
    root.mkdir()
    commands = _random_signal_workspace(root, cache=tmp_path / "cache")
    before = snapshot(root)
    seed = random.randrange(1 << 30)
    workers = {signum: _Worker(tmp_path / f"worker{signum}.log") for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(len(workers)) as pool:
            landed = {signum: pool.submit(_deliver_all, worker, commands, signum, tmp_path / f"out{signum}",
                                          seed + signum) for signum, worker in workers.items()}
            landed = {signum: future.result() for signum, future in landed.items()}
    finally:
        for worker in workers.values():
            worker.close()
    assert landed == {signal.SIGINT: DELIVERIES, signal.SIGTERM: DELIVERIES}, f"seed {seed}"
    assert snapshot(root) == before


# ------------------------------------------------------------------------------- the handlers themselves


def test_signal_handlers_only_record_and_nothing_raises_in_a_finaliser() -> None:
    """Read from the source: signal handlers are installed only by ``soupkit.interrupt`` (and the CLI's start-up
    handler, which exits at once), there is no ``weakref.finalize`` callback, and no ``__del__`` raises."""
    import ast

    package = Path(__file__).resolve().parents[2] / "soupkit"
    installs, finalizers, raising_dels = [], [], []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        name = str(path.relative_to(package.parent))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                call = ast.unparse(node.func)
                if call == "signal.signal":
                    installs.append(name)
                if call in ("weakref.finalize", "finalize"):
                    finalizers.append(f"{name}:{node.lineno}")
            if (isinstance(node, ast.FunctionDef) and node.name == "__del__"
                    and any(isinstance(inner, ast.Raise) for inner in ast.walk(node))):
                raising_dels.append(f"{name}:{node.lineno}")
    assert set(installs) <= {"soupkit/interrupt.py", "soupkit/cli/__init__.py"}, installs
    assert finalizers == [] and raising_dels == [], (finalizers, raising_dels)


_LIBRARY_RUN = """
import os, signal, sys, torch
from pathlib import Path
from soupkit import interrupt
import soupkit
root = Path(sys.argv[1])
inputs = [soupkit.save_checkpoint({f"w{j}": torch.full((1000,), float(i)) for j in range(20)},
                                  root / f"in{i}.safetensors") for i in range(2)]
calls = 0
check = interrupt.check
def signal_at_the_fifth_step():
    global calls
    calls += 1
    if calls == 5:  # a real signal, as Ctrl-C or kill would send, in the middle of the merge
        os.kill(os.getpid(), int(sys.argv[2]))
    check()
interrupt.check = signal_at_the_fifth_step
try:
    soupkit.merge(inputs, "uniform", root / "out" / "soup.safetensors")
except KeyboardInterrupt as stop:
    print(type(stop).__name__, flush=True)
    raise SystemExit(0)
print("finished", flush=True)
"""


@pytest.mark.parametrize(("signum", "status", "printed"), [(signal.SIGINT, 0, "Interrupted"),
                                                            (signal.SIGTERM, -signal.SIGTERM, "")])
def test_library_merges_answer_signals_as_python_would(tmp_path: Path, signum: int, status: int,
                                                       printed: str) -> None:
    """``soupkit.merge`` in a plain script: SIGINT becomes a ``KeyboardInterrupt`` raised from the engine (the
    script catches it); a default SIGTERM still ends the process by SIGTERM, after the temporary files are
    gone. Either way nothing is left under the output's name."""
    process = subprocess.run([sys.executable, "-c", _LIBRARY_RUN, str(tmp_path), str(int(signum))],
                             capture_output=True, text=True, timeout=120, preexec_fn=_default_signals,
                             env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert process.returncode == status, process.stderr[-2000:]
    assert process.stdout.strip() == printed, process.stdout
    assert sorted(p.name for p in tmp_path.rglob("*") if not p.name.startswith("in")) == []
