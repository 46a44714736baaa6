"""Every shell command shown in README.md and CONTRIBUTING.md runs as written.

The fenced shell blocks are parsed out of the Markdown (``bash``/``sh`` fences, and ``$ `` lines of plain ones);
each command either runs, top to bottom within its block, in a fresh folder holding what its section talks
about (small real checkpoints of the digits CNN, the demo's file layout, a tiny GPT-2 folder with a tokenizer and
fine-tunes, a tiny Llama with two PEFT adapters, mergekit configs over tiny Llamas), or is listed in ``CANNOT``
with the reason it cannot run here. A command that is neither fails the test: a new README command must run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "CONTRIBUTING.md")

#: commands that cannot run in a test, each with the reason (matched on the command's first words)
CANNOT = {
    "python3 -m venv .venv && .venv/bin/pip install": "creates a virtual environment and installs from PyPI "
                                                      "(network; the test runs inside the installed environment)",
    "python3 -m venv .venv": "creates a virtual environment (the test runs inside one already)",
    ".venv/bin/pip install": "installs from PyPI or download.pytorch.org (network)",
    ".venv/bin/pytest -q": "runs the whole test suite, this test included",
    ".venv/bin/ruff check .": "the linter over the repository (CI runs it; not a soupkit command)",
    "soupkit zeroshot --model ViT-B-32 --weights vit_b32_openai.safetensors": "needs OpenAI's CLIP ViT-B/32 "
                                                                               "weights (a download)",
    "soupkit wise zs.safetensors ft/best.safetensors --alpha 0:1:0.1 --eval recipes/clip-vit-b32-imagenet.yaml":
        "needs ImageNet and its five shift sets",
    "soupkit merge --method greedy ft/*.safetensors --eval recipes/clip-vit-b32-imagenet.yaml":
        "needs ImageNet and its five shift sets",
    "soupkit eval zs.safetensors wise.safetensors soup.safetensors --eval recipes/clip-vit-b32-imagenet.yaml":
        "needs ImageNet and its five shift sets",
    "torchrun --nproc-per-node 8": "eight processes over ImageNet (tests/eval/test_distributed.py runs two gloo "
                                   "processes instead)",
    "soupkit doctor ckpt/*.safetensors --base zs.safetensors [--eval RECIPE]": "a synopsis: the brackets are "
                                                                               "optional parts, not arguments",
}


# ------------------------------------------------------------------------------------------ the parsing


def shell_blocks(path: Path) -> list[tuple[str, list[str]]]:
    """(section heading, commands) for every fenced shell block of a Markdown file, continuation lines joined
    and comments dropped; a plain fence contributes its ``$ `` lines."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt().parse(path.read_text())
    blocks, heading = [], ""
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            heading = tokens[index + 1].content
        if token.type != "fence":
            continue
        info = token.info.strip().split()[0] if token.info.strip() else ""
        if info in ("bash", "sh", "shell", "console"):
            lines = token.content.splitlines()
        elif info == "":
            lines = [line[2:] for line in token.content.splitlines() if line.startswith("$ ")]
        else:
            continue
        commands, current = [], ""
        for line in lines:
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1].rstrip() + " "
                continue
            command = _strip_comment(current).strip()
            current = ""
            if command:
                commands.append(" ".join(command.split()))
        if commands:
            blocks.append((heading, commands))
    return blocks


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes after a space)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:
        return line
    if not words:
        return ""
    cut = line.find(" #")
    return line if cut < 0 or "#" in " ".join(words) else line[:cut]


def cannot(command: str) -> str | None:
    return next((why for start, why in CANNOT.items() if command.startswith(start)), None)


# -------------------------------------------------------------------------------------------- fixtures


def _digits_states(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from soupkit.demo_train import digits_cnn

    torch.manual_seed(seed)
    base = digits_cnn().state_dict()
    states = [base]
    for i in range(n):
        torch.manual_seed(seed + 1 + i)
        states.append({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()
                       for k, v in base.items()})
    return states


def quick_start(folder: Path) -> None:
    """ft/*.safetensors, a.pt b.pt, zs/ft as .pt and .safetensors, a pickled module, the bundled recipes."""
    from soupkit.demo_train import digits_cnn
    from soupkit.io import save_checkpoint

    states = _digits_states(3, 0)
    (folder / "ft").mkdir()
    for i, state in enumerate(states[1:]):
        save_checkpoint(state, folder / "ft" / f"run_{i}.safetensors")
    for name, state in (("zs", states[0]), ("ft", states[1]), ("a", states[1]), ("b", states[2])):
        torch.save(state, folder / f"{name}.pt")
    save_checkpoint(states[0], folder / "zs.safetensors")
    save_checkpoint(states[1], folder / "ft.safetensors")
    torch.save(digits_cnn(), folder / "wiseft_zeroshot.pt")  # a pickled nn.Module, as mlfoundations/wise-ft saves
    (folder / "recipes").symlink_to(ROOT / "recipes")


def demo_layout(folder: Path) -> None:
    """What ``soupkit demo`` writes and the README's commands read: pretrained.safetensors, ingredients/ and the
    recipe it evaluated with (weights near the start instead of trained ones: the commands are under test)."""
    from soupkit.demo import demo_recipe, write_recipe
    from soupkit.io import save_checkpoint
    from soupkit.readme_figures import DEMO_DIR

    demo = folder / DEMO_DIR
    (demo / "ingredients").mkdir(parents=True)
    states = _digits_states(9, 1)
    save_checkpoint(states[0], demo / "pretrained.safetensors")
    for i, state in enumerate(states[1:]):  # finetuned_00 ... finetuned_08: the README names finetuned_08
        save_checkpoint(state, demo / "ingredients" / f"finetuned_{i:02d}.safetensors")
    write_recipe(demo_recipe("cpu", 0), demo / "recipe.yaml")


def llm_folder(folder: Path) -> None:
    """base/ (a tiny GPT-2 with its tokenizer), ft/lr1e-5/ and ft/lr3e-5/ (save_pretrained folders), the
    llm-multiple-choice recipe copied beside its JSONL files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.eval.text_models import NUMBERS, _tokenizer, counting_rows, counting_text, write_jsonl

    tok = _tokenizer(NUMBERS, bert=False)
    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=32,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for seed, name in enumerate(("lr1e-5", "lr3e-5")):
        torch.manual_seed(seed + 1)
        model.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in init.items()})
        model.save_pretrained(folder / "ft" / name)
        tok.save_pretrained(folder / "ft" / name)
    shutil.copy(ROOT / "recipes" / "llm-multiple-choice.yaml", folder)
    write_jsonl(folder / "heldout.jsonl", counting_rows(12, seed=2))
    write_jsonl(folder / "test.jsonl", counting_rows(8, seed=3))
    write_jsonl(folder / "wiki.jsonl", counting_text(6, seed=4))


def _llama(folder: Path, seed: int, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(folder)
    return folder


def lora_folder(folder: Path) -> None:
    """base/ (a tiny Llama) and two PEFT LoRA adapters of it, adapterA/ and adapterB/."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    _llama(folder / "base", 0)
    for seed, name in enumerate(("adapterA", "adapterB")):
        torch.manual_seed(10 + seed)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(folder / "base"),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
        model.save_pretrained(folder / name)


SECTIONS: dict[str, Callable[[Path], None]] = {
    "CLI quick start": quick_start,
    "The demo": demo_layout,
    "Will these checkpoints soup? `soupkit doctor`": demo_layout,
    "Greedy soup of your LLM fine-tunes": llm_folder,
    "LLMs and LoRA adapters": lora_folder,
}


def blocks() -> list[tuple[str, str, list[str]]]:
    return [(doc, heading, commands) for doc in DOCS for heading, commands in shell_blocks(ROOT / doc)]


@dataclass
class Done:
    returncode: int
    stderr: str


def run_command(command: str, cwd: Path) -> Done:
    """``command`` as a user's shell runs it in ``cwd``: a plain ``soupkit ...`` command (words and globs only)
    in this process through the CLI's entry point (saving a ~3 s interpreter start per command), anything
    else through bash."""
    import glob
    import io
    from contextlib import redirect_stderr, redirect_stdout

    words = shlex.split(command)
    if words[0] == "soupkit" and not set("|&;<>$`()") & set(command):
        args = []
        for word in words[1:]:
            matches = sorted(glob.glob(word, root_dir=cwd)) if glob.has_magic(word) else []
            args += matches or [word]  # bash leaves a glob that matches nothing as it is
        err, previous = io.StringIO(), Path.cwd()
        os.chdir(cwd)
        try:
            from soupkit.cli import main

            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                main(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            os.chdir(previous)
        return Done(code, err.getvalue())
    return _run_shell(command, cwd)


def _run_shell(command: str, cwd: Path) -> Done:
    """``command`` through bash, ``soupkit`` being this checkout's CLI."""
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    launcher = bin_dir / "soupkit"
    if not launcher.exists():
        launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m soupkit "$@"\n')
        launcher.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "COLUMNS": "100", "SOUPKIT_CACHE_DIR": str(cwd / ".cache")}
    done = subprocess.run(["bash", "-c", f"set -e -o pipefail; {command}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    return Done(done.returncode, done.stderr)


# ------------------------------------------------------------------------------------------------ tests


def test_the_parser_finds_the_commands() -> None:
    found = {command for _, _, commands in blocks() for command in commands}
    assert "soupkit methods" in found
    assert ("soupkit wise soupkit-demo/pretrained.safetensors soupkit-demo/ingredients/finetuned_08.safetensors "
            "--alpha 0:1:0.1 --eval soupkit-demo/recipe.yaml -o wise.safetensors") in found
    assert not any("#" in c for c in found), [c for c in found if "#" in c]


def test_every_command_runs_or_says_why_not() -> None:
    """No command is in neither list: a command added to the README must run here, or be listed in CANNOT."""
    unknown = [(doc, heading, c) for doc, heading, commands in blocks() for c in commands
               if not cannot(c) and heading not in SECTIONS]
    assert not unknown, unknown


@pytest.mark.slow
@pytest.mark.parametrize("heading", list(dict.fromkeys(SECTIONS)))
def test_readme_commands_run_as_written(heading: str, tmp_path: Path, monkeypatch) -> None:
    """Each block of the section, top to bottom, in a fresh folder holding what the section talks about."""
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("SOUPKIT_CACHE_DIR", str(tmp_path / ".cache"))
    ran = 0
    for number, (_, block_heading, commands) in enumerate(blocks()):
        if block_heading != heading:
            continue
        folder = tmp_path / f"block{number}"
        folder.mkdir()
        SECTIONS[heading](folder)
        for command in commands:
            if cannot(command):
                continue
            done = run_command(command, folder)
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-3000:]}"
            ran += 1
    assert ran, f"no command of {heading!r} ran"


MERGEKIT_MODELS = ("Mistral-7B-v0.1", "NeuralHermes-2.5", "Llama-2-13b", "orca-13b", "platypus-13b")


@pytest.mark.slow
def test_readme_mergekit_configs_run(tmp_path: Path) -> None:
    """The README's mergekit YAML examples, over tiny Llamas named as in them, give a folder transformers loads
    (`soupkit merge --config mergekit.yml -o out/`, the command the section gives)."""
    from markdown_it import MarkdownIt
    from transformers import LlamaForCausalLM

    for seed, name in enumerate(MERGEKIT_MODELS):
        _llama(tmp_path / name, seed, layers=3)
    configs = [t.content for t in MarkdownIt().parse((ROOT / "README.md").read_text())
               if t.type == "fence" and t.info.strip() == "yaml" and "merge_method:" in t.content]
    assert len(configs) == 2
    for number, config in enumerate(configs):
        (tmp_path / "mergekit.yml").write_text(config)
        out = f"out{number}/"
        done = run_command(f"soupkit merge --config mergekit.yml -o {out}", tmp_path)
        assert done.returncode == 0, f"{config}\n{done.stderr[-3000:]}"
        LlamaForCausalLM.from_pretrained(tmp_path / out)
