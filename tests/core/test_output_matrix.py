"""Every command that writes a checkpoint honours every output option, or refuses it in one line: the matrix
(command x option), checked on the written files. The soup algorithms' rows are in tests/soups/test_output_options.py
(they also need an evaluator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from soupkit.io import load_checkpoint, open_checkpoint
from soupkit.options import OutputOptions
from tests.conftest import snapshot, tiny_state

COMMANDS = ["merge-uniform", "merge-ties", "wise", "convert", "zeroshot"]
#: options a command cannot honour, with the words of its refusal
REFUSED = {
    ("convert", "include"), ("convert", "exclude"), ("convert", "allow_missing"), ("convert", "precise"),
    ("zeroshot", "include"), ("zeroshot", "exclude"), ("zeroshot", "allow_missing"), ("zeroshot", "precise"),
    ("zeroshot", "ema"), ("zeroshot", "strip_prefix"),
    *((command, "rank") for command in COMMANDS),  # rank shapes a soup of LoRA adapters (tests/test_lora_cli.py)
}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Two models, a base, a .pt holding EMA weights and a Lightning-style .pt whose names carry ``model.``."""
    made = {}
    for name, seed in [("a", 0), ("b", 1), ("base", 2)]:
        made[name] = tmp_path / f"{name}.safetensors"
        save_file(tiny_state(seed), str(made[name]))
    for name, seed in [("ema", 3), ("ema_b", 5), ("ema_base", 9)]:
        made[name] = tmp_path / f"{name}.pt"
        torch.save({"state_dict": tiny_state(seed), "state_dict_ema": tiny_state(seed + 1)}, made[name])
    for name, seed in [("prefixed", 7), ("prefixed_b", 8), ("prefixed_base", 11)]:
        made[name] = tmp_path / f"{name}.pt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in tiny_state(seed).items()}}, made[name])
    from tests.eval.helpers import TINY_CLIP

    made["clip"] = tmp_path / "soupkit-tiny-clip.json"
    made["clip"].write_text(json.dumps(TINY_CLIP))
    made["classes"] = tmp_path / "classes.txt"
    made["classes"].write_text("cat\ndog\n")
    return made


def argv(command: str, files: dict[str, Path], out: Path, option: str) -> list[str]:
    """The command line, with inputs chosen so the option has something to act on."""
    a, b, base = files["a"], files["b"], files["base"]
    if option in ("ema", "strip_prefix"):  # every input holds EMA weights / carries the prefix
        a, b, base = (files[f"{'ema' if option == 'ema' else 'prefixed'}{suffix}"] for suffix in ("", "_b", "_base"))
    if command == "merge-uniform":
        return ["merge", a, b, "-o", out]
    if command == "merge-ties":
        return ["merge", a, b, "-m", "ties", "--base", base, "-o", out]
    if command == "wise":
        return ["wise", a, b, "--alpha", "0.3", "-o", out]
    if command == "convert":
        return ["convert", a, out]
    return ["zeroshot", "--model", "soupkit-tiny-clip", "--config", files["clip"], "--classes", files["classes"],
            "--templates", "simple", "-o", out]


VALUES = {"dtype": ["--dtype", "fp16"], "precise": ["--precise"], "device": ["--device", "cpu"],
          "shard_size": ["--shard-size", "400B"], "include": ["--include", "head.*"],
          "exclude": ["--exclude", "head.*"],
          "allow_missing": ["--allow-missing"], "allow_nonfinite": ["--allow-nonfinite"], "ema": ["--ema"],
          "force": ["--force"], "strip_prefix": ["--strip-prefix", "model."],
          "add_prefix": ["--add-prefix", "net."],
          "rank": ["--rank", "4"]}


def test_the_matrix_covers_every_option() -> None:
    assert set(VALUES) == set(OutputOptions.model_fields)


def check_written(command: str, option: str, out: Path, files: dict[str, Path], cli, args: list) -> None:
    """What the written file must show for ``option``."""
    if option == "shard_size":
        index = out.with_name(out.name + ".index.json")
        assert index.exists() and len(json.loads(index.read_text())["weight_map"]) > 1
        state = load_checkpoint(index)
    else:
        state = load_checkpoint(out)
    floats = [k for k, v in state.items() if v.is_floating_point()]
    if option == "dtype":
        assert all(state[k].dtype == torch.float16 for k in floats)
    elif option in ("include", "exclude"):
        first = load_checkpoint(files["a"])
        copied = [k for k in floats if (k.startswith("head.") if option == "exclude" else not k.startswith("head."))]
        assert copied and all(torch.equal(state[k], first[k]) for k in copied)
    elif option == "ema" and command == "convert":
        expected = tiny_state(4)  # the EMA weights, not the raw ones
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    elif option == "ema":
        raw = load_checkpoint(files["ema"])  # without --ema: the raw weights
        assert not torch.equal(state["head.weight"], raw["head.weight"])
    elif option == "strip_prefix":
        assert not any(k.startswith("model.") for k in state) and "head.weight" in state
    elif option == "add_prefix":
        assert state and all(k.startswith("net.") for k in state)
    elif option == "force":
        again = cli(*args)  # replaces the file it wrote
        assert again.code == 0, again.err
    if option != "force" and command != "zeroshot":
        refused = cli(*[a for a in args if a != "--force"])  # an existing output without --force: refused
        assert refused.code == 2 and "use --force" in refused.err


@pytest.mark.parametrize("option", list(VALUES))
@pytest.mark.parametrize("command", COMMANDS)
def test_option_is_honoured_or_refused(command: str, option: str, files: dict[str, Path], tmp_path: Path,
                                       cli) -> None:
    out = tmp_path / "out" / "result.safetensors"
    out.parent.mkdir()
    args = [*argv(command, files, out, option), *VALUES[option], "-q"]
    before = snapshot(tmp_path)
    result = cli(*args)
    if (command, option) in REFUSED:
        assert result.code == 2, result.err
        assert len(result.err.strip().splitlines()) == 1 and "does not apply" in result.err, result.err
        assert not any((tmp_path / "out").iterdir())
        return
    assert result.code == 0, (command, option, result.err)
    assert snapshot(tmp_path) | {} and {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out/")} \
        == {k: v for k, v in before.items()}, "an input changed"
    check_written(command, option, out, files, cli, args)
    with open_checkpoint(out if option != "shard_size" else out.with_name(out.name + ".index.json")) as reader:
        assert "soupkit.version" in reader.metadata or option == "shard_size"
