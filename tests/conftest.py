"""Shared fixtures: tiny real checkpoints written by the tests themselves, and an in-process CLI runner."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Tests run as from a terminal, where Ctrl-C raises KeyboardInterrupt. A runner started as a background job
    of a script (``pytest &``, ``nohup``) inherits SIGINT ignored, as POSIX has it, and so does every xdist
    worker and child process under it; soupkit rightly leaves an ignored SIGINT ignored (tested in
    tests/reliability/test_interrupt_moments.py), so the tests that send SIGINT would see nothing. Their
    children inherit the default again: exec resets a handled signal, never an ignored one."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding ``slow`` or ``distributed`` tests run first, the rest keep their order: under pytest-xdist's
    ``--dist loadfile --no-loadscope-reorder`` (the default, see pyproject.toml) the long files start at once and
    the many short ones fill in at the end, instead of a long one running alone while the other core idles. GPU
    tests skip cleanly where there is no CUDA device."""
    slow_files = {item.path for item in items if "slow" in item.keywords or "distributed" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: every worker collects the same order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_state(seed: int, *, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A small model-shaped state dict: conv, norm with integer counter, linear head, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "bn.weight": torch.rand(8, generator=g) + 0.5,
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(100, dtype=torch.int64),
        "head.weight": torch.randn(10, 8, generator=g),
        "head.bias": torch.randn(10, generator=g),
        "pos_ids": torch.arange(16, dtype=torch.int64),
        "mask": torch.ones(4, dtype=torch.bool),
    }
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    state.update(extra or {})
    return state


@pytest.fixture
def make_ckpt(tmp_path: Path) -> Callable[..., Path]:
    """``make_ckpt("a", seed=1)`` writes a tiny safetensors checkpoint and returns its path."""

    def make(name: str, seed: int = 0, *, state: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
        from safetensors.torch import save_file

        path = tmp_path / (name if "." in name else f"{name}.safetensors")
        save_file(state if state is not None else tiny_state(seed, dtype=dtype), str(path))
        return path

    return make


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Name -> sha256 of every file under ``folder`` (to prove inputs were not touched and nothing was left).
    Symlinks are recorded by their target, never followed (a hostile case links to /proc/self/pagemap), and
    empty folders are recorded too (an output folder left behind must show)."""
    state = {}
    for p in sorted(folder.rglob("*")):
        name = str(p.relative_to(folder))
        if p.is_symlink():
            state[name] = f"link -> {os.readlink(p)}"
        elif p.is_file():
            state[name] = digest(p)
        elif p.is_dir() and not any(p.iterdir()):
            state[name] = "empty folder"
    return state


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``soupkit ARGS`` in-process through the real entry point (errors, exit codes and all)."""
    from soupkit.cli import main

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(autouse=True)
def _reproducible_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOUPKIT_CACHE_DIR", str(tmp_path / ".soupkit-cache"))
    os.environ.pop("SOURCE_DATE_EPOCH", None)
