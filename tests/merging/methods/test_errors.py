"""Bad parameters are one-line ``SoupkitError``s naming the option, from the library and from the CLI."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

import soupkit
from soupkit.errors import CheckpointError, IncompatibleCheckpointsError, ParameterError
from soupkit.io import load_checkpoint
from tests.merging.methods._common import task_states, write

SOUPKIT = Path(sys.executable).with_name("soupkit")

LIBRARY_CASES = [
    ("ties", {"density": 0.0}, True, 3, r"ties: density\[0\] must be in \(0, 1\], got 0.0"),
    ("ties", {"density": [0.5, 1.5, 0.5]}, True, 3, r"ties: density\[1\] must be in \(0, 1\], got 1.5"),
    ("ties", {"density": [0.5, 0.5]}, True, 3, r"ties: density has 2 values for 3 input models"),
    ("ties", {"weights": [1.0, -1.0, 1.0]}, True, 3, r"ties: weights\[1\] must be >= 0, got -1.0"),
    ("dare_ties", {"density": 2.0}, True, 3, r"dare_ties: density\[0\] must be in \(0, 1\]"),
    ("dare_linear", {"drop_rate": 1.0}, True, 3, r"dare_linear: drop_rate\[0\] must be in \[0, 1\).*got 1.0"),
    ("dare_ties", {"drop_rate": -0.1}, True, 3, r"dare_ties: drop_rate\[0\] must be in \[0, 1\)"),
    ("dare_linear", {"weights": [1.0, -1.0, 0.0]}, True, 3, r"weights sum to 0"),
    ("slerp", {"t": 1.5}, False, 2, r"slerp: t must be in \[0, 1\].*got 1.5"),
    ("ties", {"convention": "mergkit"}, True, 3, r"ties: convention must be one of soupkit, mergekit, got 'mergkit'"),
    ("dare_ties", {"convention": "x"}, True, 3, r"dare_ties: convention must be one of soupkit, mergekit"),
    ("slerp", {"convention": "x"}, False, 2, r"slerp: convention must be one of soupkit, mergekit"),
    ("model_stock", {"convention": "x"}, True, 3, r"model_stock: convention must be one of soupkit, mergekit"),
    ("slerp", {"t": -0.1}, False, 2, r"slerp: t must be in \[0, 1\]"),
    ("slerp", {}, False, 3, r"method 'slerp' takes exactly 2 input models, got 3"),
    ("model_stock", {}, True, 1, r"method 'model_stock' needs at least 2 input models, got 1"),
    ("task_arithmetic", {}, False, 2, r"method 'task_arithmetic' needs a base model \(--base\)"),
    ("ties", {}, False, 2, r"method 'ties' needs a base model"),
    ("ties", {"densty": 0.5}, True, 2, r"no parameter 'densty'. Did you mean 'density'\?"),
    ("fisher", {}, False, 2, r"method 'fisher' needs parameter fishers"),
    ("fisher", {"fishers": ["a", "b"], "floor": 0.0}, False, 2, r"fisher: floor must be > 0, got 0.0"),
    ("dare_linear", {"seed": 1.5}, True, 2, r"dare_linear: seed must be an integer, got 1.5"),
]


@pytest.mark.parametrize(("method", "params", "with_base", "n", "message"), LIBRARY_CASES)
def test_library_parameter_errors(method: str, params: dict, with_base: bool, n: int, message: str) -> None:
    base, models = task_states(n)
    with pytest.raises(ParameterError, match=message) as caught:
        soupkit.merge(models, method, base=base if with_base else None, **params)
    assert "\n" not in str(caught.value)


def test_fisher_file_errors_name_the_file(tmp_path: Path) -> None:
    _, models = task_states(2)
    good = write(tmp_path, "good", {"head.weight": torch.rand(10, 8)})
    with pytest.raises(CheckpointError, match="missing.safetensors: no such file"):
        soupkit.merge(models, "fisher", fishers=[str(good), str(tmp_path / "missing.safetensors")])
    misnamed = write(tmp_path, "misnamed", {"module.head.weight": torch.rand(10, 8)})
    with pytest.raises(IncompatibleCheckpointsError, match=r"misnamed.safetensors: Fisher tensor "
                                                           r"'module.head.weight'.*Did you mean 'head.weight'"):
        soupkit.merge(models, "fisher", fishers=[str(good), str(misnamed)])
    wrong_shape = write(tmp_path, "shape", {"head.weight": torch.rand(8, 10)})
    with pytest.raises(IncompatibleCheckpointsError, match=r"'head.weight' has shape \(8, 10\)"):
        soupkit.merge(models, "fisher", fishers=[str(good), str(wrong_shape)])
    assert not list(tmp_path.glob("*.tmp*"))


# ------------------------------------------------------------------------------------------ CLI


@cache
def merge_help() -> str:
    from typer.testing import CliRunner

    from soupkit.cli import app

    return CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "200"}).output


def needs_flags(*flags: str) -> None:
    missing = [f for f in flags if f not in merge_help()]
    if missing:
        pytest.skip(f"soupkit merge has no {', '.join(missing)} yet (soupkit/cli/merge_cmd.py is being written)")


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    base, models = task_states(3)
    write(tmp_path, "base", base)
    for i, m in enumerate(models):
        write(tmp_path, f"m{i}", m)
    return tmp_path


CLI_CASES = [
    (["m0", "m1", "--method", "ties", "--base", "base", "--density", "1.5"], "--density[0] must be in (0, 1]"),
    (["m0", "m1", "--method", "dare_linear", "--base", "base", "--drop-rate", "1"], "--drop-rate[0] must be in [0, 1)"),
    (["m0", "m1", "--method", "slerp", "--t", "2"], "--t must be in [0, 1]"),
    (["m0", "m1", "m2", "--method", "slerp"], "takes exactly 2 input models"),
    (["m0", "m1", "--method", "task_arithmetic", "--scaling", "0.5"], "needs a base model (--base)"),
]


def cli_argv(folder: Path, args: list[str]) -> list[str]:
    names = [f"{a}.safetensors" if (folder / f"{a}.safetensors").exists() else a for a in args]
    return ["merge", *names, "-o", "out.safetensors"]


@pytest.mark.parametrize(("args", "message"), CLI_CASES)
def test_cli_parameter_errors_exit_2_with_one_line(checkpoints: Path, cli, monkeypatch: pytest.MonkeyPatch,
                                                   args: list[str], message: str) -> None:
    """Through the real entry point, in-process (one case also as a real subprocess below)."""
    needs_flags("--base", "--scaling", "--density", "--drop-rate", "--t", "--seed", "--weights")
    monkeypatch.chdir(checkpoints)
    result = cli(*cli_argv(checkpoints, args))
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.err
    assert not (checkpoints / "out.safetensors").exists()


def test_cli_subprocess_error_is_one_stderr_line(checkpoints: Path) -> None:
    needs_flags("--base", "--density")
    result = subprocess.run([str(SOUPKIT), *cli_argv(checkpoints, CLI_CASES[0][0])], cwd=checkpoints,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"soupkit merge: error: ties: {CLI_CASES[0][1]}, got 1.5"]


def test_cli_dare_matches_the_library(checkpoints: Path) -> None:
    needs_flags("--base", "--drop-rate", "--seed", "--weights")
    result = subprocess.run([str(SOUPKIT), "merge", "m0.safetensors", "m1.safetensors", "--method", "dare_ties",
                             "--base", "base.safetensors", "--drop-rate", "0.5", "--seed", "3", "--weights", "1,2",
                             "--density", "0.7", "-q", "-o", "out.safetensors"],
                            cwd=checkpoints, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    expected = soupkit.merge([checkpoints / "m0.safetensors", checkpoints / "m1.safetensors"], "dare_ties",
                             base=checkpoints / "base.safetensors", drop_rate=0.5, seed=3, weights=[1, 2],
                             density=0.7)
    written = load_checkpoint(checkpoints / "out.safetensors")
    assert all(torch.equal(written[k], expected[k]) for k in expected)
