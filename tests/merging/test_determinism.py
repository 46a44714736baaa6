"""Determinism: the same merge twice gives byte-identical files (with ``SOURCE_DATE_EPOCH`` set, the only
time-dependent byte is pinned), and a uniform soup does not depend on the order of its inputs beyond fp32
rounding."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import soupkit
from soupkit.io import load_checkpoint
from tests.conftest import digest, tiny_state


@pytest.fixture
def inputs(make_ckpt) -> list[Path]:
    return [make_ckpt(f"m{i}", i) for i in range(3)]


def files_under(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "{out}/soup.safetensors"],
        ["--method", "linear", "--weights", "0.2,0.3,0.5", "--dtype", "bf16", "-o", "{out}/soup.safetensors"],
        ["--method", "dare_ties", "--base", "{base}", "--density", "0.5", "--drop-rate", "0.3", "--seed", "7",
         "-o", "{out}/soup.safetensors"],
        ["--shard-size", "700B", "-o", "{out}/soup.safetensors"],
        ["-o", "{out}/soup.pt"],
    ],
    ids=["uniform", "linear-bf16", "dare_ties-seeded", "sharded", "torch-output"],
)
def test_same_merge_twice_is_byte_identical(tmp_path: Path, inputs: list[Path], make_ckpt, cli, monkeypatch,
                                            args: list[str]) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    base = make_ckpt("base", 99)
    runs = []
    for run in ("first", "second"):
        out = tmp_path / run
        out.mkdir()
        result = cli("merge", *inputs, *(a.format(out=out, base=base) for a in args))
        assert result.code == 0, result.err
        runs.append(files_under(out))
    assert runs[0] == runs[1]
    assert runs[0], "nothing was written"


def test_wise_several_alphas_twice_is_byte_identical(tmp_path: Path, inputs: list[Path], cli, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    runs = []
    for run in ("first", "second"):
        out = tmp_path / run
        out.mkdir()
        result = cli("wise", inputs[0], inputs[1], "--alpha", "0,0.25,1", "-o", out / "wise.safetensors")
        assert result.code == 0, result.err
        runs.append(files_under(out))
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_uniform_is_independent_of_input_order(tmp_path: Path) -> None:
    states = [tiny_state(i) for i in range(4)]
    paths = []
    for i, state in enumerate(states):
        paths.append(soupkit.save_checkpoint(state, tmp_path / f"m{i}.safetensors"))
    floats = [k for k, v in states[0].items() if v.is_floating_point()]
    reference = {k: sum(s[k].double() for s in states) / len(states) for k in floats}
    outputs = [soupkit.uniform_soup(list(order)) for order in itertools.permutations(paths)]
    for out in outputs:
        for key, expected in reference.items():
            # fp32 accumulation: any order is within a few ulps of the exact mean and of every other order
            torch.testing.assert_close(out[key].double(), expected, rtol=4 * 2**-23, atol=4 * 2**-23)
            torch.testing.assert_close(out[key], outputs[0][key], rtol=8 * 2**-23, atol=8 * 2**-23)
        for key in ("bn.num_batches_tracked", "pos_ids", "mask"):
            assert torch.equal(out[key], states[0][key])
    # and on disk: reading the file back gives the in-memory result exactly
    written = soupkit.uniform_soup(paths, tmp_path / "soup.safetensors")
    back = load_checkpoint(written)
    assert all(torch.equal(back[k], outputs[0][k]) for k in back)
