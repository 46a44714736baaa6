"""Round three of the bad-input corpus, Hugging Face folders (issues 22 and 26): small files that are links out of
the folder, /proc files, FIFOs, devices and folders under a small file's name; huge and broken small files; output
folders that exist, are files or symlinks, or lie inside an input; configs whose weight ties lie. Registered into
``corpus.CASES`` (imported at the end of ``corpus.py``), so ``test_corpus.py`` gives every case the same treatment:
exit 2, one line naming the file, no traceback, nothing under the output's name, inputs byte-identical, no canary.

Every case whose input links to a secret also asserts the secret's bytes are not echoed; ``test_faults.py`` checks
that they never reach an output either (the corpus's "nothing left behind" already implies it here).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from tests.hostile.corpus import Expect, Workspace
from tests.hostile.corpus import case as register

#: every case this module adds
FOLDERS: list[str] = []
SECRET = "SECRET-TOKEN-9d3a"
GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "tie_word_embeddings": True}


def case(name: str) -> Callable[[Callable[[Workspace], Expect]], Callable[[Workspace], Expect]]:
    FOLDERS.append(name)
    return register(name)


def tensors(seed: int, *, head: bool = False, distinct_head: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"transformer.wte.weight": torch.randn(6, 4, generator=g), "transformer.h.0.w": torch.randn(4, 4,
                                                                                                        generator=g)}
    if head or distinct_head:
        state["lm_head.weight"] = torch.randn(6, 4, generator=g) if distinct_head else state[
            "transformer.wte.weight"].clone()
    return state


def model_folder(w: Workspace, name: str, seed: int = 0, config: dict | None = None, **kw: bool) -> Path:
    """A Hugging Face folder: model.safetensors, config.json and two tokenizer files."""
    from safetensors.torch import save_file

    folder = w.root / name
    folder.mkdir()
    save_file(tensors(seed, **kw), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(GPT2_CONFIG if config is None else config))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "special_tokens_map.json").write_text("{}")
    return folder


def secret(w: Workspace) -> Path:
    """A private file outside every input folder (another user's token, an ssh key)."""
    path = w.root / "private" / "token"
    path.parent.mkdir(exist_ok=True)
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


def folder_merge(w: Workspace, *needles: str, out: str | None = None, extra: tuple[str, ...] = (),
                 config: dict | None = None) -> tuple[Expect, Path, Path]:
    """``soupkit merge m1 m2 -o soup/``: returns the expectation (needles to fill in) and the two folders."""
    first, second = model_folder(w, "m1", 0, config), model_folder(w, "m2", 1, config)
    argv = ["merge", str(first), str(second), "-o", out or f"{w.root / 'soup'}/", *extra]
    return Expect(argv, needles, w.canary, absent=(SECRET,)), first, second


def replace(folder: Path, name: str) -> Path:
    path = folder / name
    if path.exists() or path.is_symlink():
        path.unlink()
    return path


# ------------------------------------------------------------------------------------------ links out


LINKS: dict[str, tuple[str, Callable[[Workspace], str | Path]]] = {
    "config.json -> a 0600 file outside (absolute)": ("config.json", lambda w: secret(w)),
    "tokenizer.json -> ../private/token (relative)": ("tokenizer.json", lambda w: (secret(w), "../private/token")[1]),
    "special_tokens_map.json -> /proc/self/environ": ("special_tokens_map.json", lambda w: "/proc/self/environ"),
    "added_tokens.json -> /proc/self/pagemap": ("added_tokens.json", lambda w: "/proc/self/pagemap"),
    "generation_config.json -> /dev/zero": ("generation_config.json", lambda w: "/dev/zero"),
    "chat_template.jinja -> /etc/passwd": ("chat_template.jinja", lambda w: "/etc/passwd"),
    "merges.txt -> a dangling name": ("merges.txt", lambda w: "gone.txt"),
    "vocab.json -> /proc/self/mem": ("vocab.json", lambda w: "/proc/self/mem"),
}

for _title, (_name, _target) in LINKS.items():
    def _link_case(w: Workspace, name: str = _name, target: Callable[[Workspace], str | Path] = _target) -> Expect:
        expect, first, _ = folder_merge(w)
        os.symlink(target(w), replace(first, name))
        expect.needles = (str(first / name), "symlink")
        return expect

    case(f"folder output: {_title}")(_link_case)


@case("folder output: tokenizer_config.json through a linked subfolder")
def _linked_subfolder(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    secret(w)
    (w.root / "private" / "tokenizer_config.json").write_text(json.dumps({"token": SECRET}))
    os.symlink(w.root / "private", first / "sub")
    os.symlink("sub/tokenizer_config.json", replace(first, "tokenizer_config.json"))
    expect.needles = (str(first / "tokenizer_config.json"), "outside the folder")
    return expect


@case("folder output: tokenizer.model is a symlink loop")
def _loop(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    os.symlink("b.model", first / "tokenizer.model")
    os.symlink("tokenizer.model", first / "b.model")
    expect.needles = (str(first / "b.model"), "symlink")
    return expect


@case("folder output: vocab.txt is a FIFO")
def _fifo(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    os.mkfifo(first / "vocab.txt")
    expect.needles = (str(first / "vocab.txt"), "a FIFO, not a regular file")
    return expect


@case("folder output: tokenizer.json is a device")
def _device(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    try:
        os.mknod(first / "tokenizer.json", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
        expect.needles = (str(first / "tokenizer.json"), "a device, not a regular file")
    except PermissionError:  # not root: a link to a device is refused the same way
        os.symlink("/dev/zero", first / "tokenizer.json")
        expect.needles = (str(first / "tokenizer.json"), "symlink")
    return expect


@case("folder output: config.json is a folder")
def _config_folder(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    replace(first, "config.json").mkdir()
    expect.needles = (str(first / "config.json"), "a folder, not a regular file")
    return expect


@case("folder output: tokenizer.json is a folder")
def _tokenizer_folder(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    (first / "tokenizer.json").mkdir()
    expect.needles = (str(first / "tokenizer.json"), "a folder, not a regular file")
    return expect


@case("second input's config.json -> /proc/self/environ (ties reader)")
def _second_config(w: Workspace) -> Expect:
    expect, _, second = folder_merge(w)
    os.symlink("/proc/self/environ", replace(second, "config.json"))
    expect.needles = (str(second / "config.json"), "outside the folder")
    return expect


@case("file output from a folder whose config.json links out")
def _file_output(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w, out=str(w.root / "soup.safetensors"))
    os.symlink(secret(w), replace(first, "config.json"))
    expect.needles = (str(first / "config.json"), "outside the folder")
    return expect


@case("inspect: a folder whose config.json links to /proc/self/environ")
def _inspect(w: Workspace) -> Expect:
    folder = model_folder(w, "m1")
    os.symlink("/proc/self/environ", replace(folder, "config.json"))
    return Expect(["inspect", str(folder)], (str(folder / "config.json"), "outside the folder"), w.canary)


def adapter(w: Workspace, name: str, seed: int) -> Path:
    from safetensors.torch import save_file

    folder = w.root / name
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.transformer.h.0.lora_A.weight": torch.randn(2, 4, generator=g),
               "base_model.model.transformer.h.0.lora_B.weight": torch.randn(4, 2, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": ["h.0"]}))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@case("adapter soup: adapter_config.json -> a 0600 file outside")
def _adapter_config(w: Workspace) -> Expect:
    a, b = adapter(w, "a1", 0), adapter(w, "a2", 1)
    os.symlink(secret(w), replace(a, "adapter_config.json"))
    return Expect(["merge", str(a), str(b), "-o", f"{w.root / 'soup'}/"],
                  (str(a / "adapter_config.json"), "outside the folder"), w.canary, absent=(SECRET,))


@case("adapter soup: the template's tokenizer_config.json -> /proc/self/environ")
def _adapter_tokenizer(w: Workspace) -> Expect:
    a, b = adapter(w, "a1", 0), adapter(w, "a2", 1)
    os.symlink("/proc/self/environ", replace(a, "tokenizer_config.json"))
    return Expect(["merge", str(a), str(b), "-o", f"{w.root / 'soup'}/"],
                  (str(a / "tokenizer_config.json"), "outside the folder"), w.canary)


# ------------------------------------------------------------------------------------------ huge and broken


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)


@case("folder output: a sparse 300 MiB tokenizer.json")
def _huge_tokenizer(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    _sparse(first / "tokenizer.json", 300 * 2**20)
    expect.needles = (str(first / "tokenizer.json"), "314,572,800 bytes", "at most")
    return expect


@case("a 20 MiB config.json")
def _huge_config(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    with open(first / "config.json", "r+b") as handle:
        handle.seek(0, 2)
        handle.truncate(20 * 2**20)
    expect.needles = (str(first / "config.json"), "20,971,520 bytes")
    return expect


@case("adapter soup: a 20 MiB adapter_config.json")
def _huge_adapter_config(w: Workspace) -> Expect:
    a, b = adapter(w, "a1", 0), adapter(w, "a2", 1)
    _sparse(replace(a, "adapter_config.json"), 20 * 2**20)
    return Expect(["merge", str(a), str(b), "-o", f"{w.root / 'soup'}/"],
                  (str(a / "adapter_config.json"), "bytes"), w.canary)


@case("folder output: truncated config.json with --dtype bf16")
def _truncated_config(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w, extra=("--dtype", "bf16"))
    (first / "config.json").write_text(json.dumps(GPT2_CONFIG)[:25])
    expect.needles = (str(first / "config.json"), "not valid JSON")
    return expect


@case("folder output: config.json holds a JSON list")
def _config_list(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    (first / "config.json").write_text("[1, 2]")
    expect.needles = (str(first / "config.json"), "not a JSON object")
    return expect


@case("folder output: config.json nested 100k deep")
def _config_deep(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    (first / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    expect.needles = (str(first / "config.json"),)
    return expect


@case("folder output: config.json is not UTF-8")
def _config_bytes(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    (first / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    expect.needles = (str(first / "config.json"), "not valid JSON")
    return expect


# ------------------------------------------------------------------------------------------ output folders


@case("output folder is a file")
def _output_file(w: Workspace) -> Expect:
    expect, _, _ = folder_merge(w, out=str(w.root / "soup"))
    (w.root / "soup").write_text("not a folder")
    expect.needles = (str(w.root / "soup"), "output folder is a file")
    return expect


@case("output folder is a symlink to a folder")
def _output_link(w: Workspace) -> Expect:
    expect, _, _ = folder_merge(w)
    (w.root / "elsewhere").mkdir()
    (w.root / "elsewhere" / "keep.txt").write_text("mine")
    os.symlink(w.root / "elsewhere", w.root / "soup")
    expect.needles = (str(w.root / "soup"), "is a symlink")
    return expect


@case("output folder is a dangling symlink")
def _output_dangling(w: Workspace) -> Expect:
    expect, _, _ = folder_merge(w)
    os.symlink(w.root / "nowhere", w.root / "soup")
    expect.needles = (str(w.root / "soup"), "is a symlink")
    return expect


@case("output folder inside an input folder")
def _output_inside(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    expect.argv[4] = f"{first / 'soup'}/"
    expect.needles = (str(first / "soup"), "lies inside the input folder", str(first))
    return expect


@case("output folder is an input folder, with --force")
def _output_is_input(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w, extra=("--force",))
    expect.argv[4] = str(first)
    expect.needles = (str(first), "holds the input")
    return expect


@case("output folder exists and is not empty")
def _output_not_empty(w: Workspace) -> Expect:
    expect, _, _ = folder_merge(w)
    (w.root / "soup").mkdir()
    (w.root / "soup" / "notes.txt").write_text("mine")
    expect.needles = (str(w.root / "soup"), "not empty", "--force")
    return expect


@case("output folder with a subfolder, with --force")
def _output_subfolder(w: Workspace) -> Expect:
    expect, _, _ = folder_merge(w, extra=("--force",))
    (w.root / "soup" / "runs").mkdir(parents=True)
    (w.root / "soup" / "runs" / "log").write_text("mine")
    expect.needles = (str(w.root / "soup"), "subfolder 'runs'")
    return expect


@case("output folder with a file soupkit did not write, with --force")
def _output_foreign(w: Workspace) -> Expect:
    expect, _, _ = folder_merge(w, extra=("--force",))
    (w.root / "soup").mkdir()
    (w.root / "soup" / "thesis.tex").write_text("mine")
    expect.needles = (str(w.root / "soup"), "'thesis.tex'", "did not write")
    return expect


@case("output folder holds other weights")
def _output_stale(w: Workspace) -> Expect:
    expect, _, _ = folder_merge(w)
    (w.root / "soup").mkdir()
    (w.root / "soup" / "pytorch_model.bin").write_bytes(b"old")
    expect.needles = (str(w.root / "soup"), "already holds weights (pytorch_model.bin)")
    return expect


@case("output folder holds an earlier soup, no --force")
def _output_exists(w: Workspace) -> Expect:
    expect, _, _ = folder_merge(w)
    (w.root / "soup").mkdir()
    (w.root / "soup" / "model.safetensors").write_bytes(b"old")
    expect.needles = (str(w.root / "soup" / "model.safetensors"), "output exists; use --force")
    return expect


# ------------------------------------------------------------------------------------------ ties that lie


@case("config ties lm_head but the input stores a different one")
def _tie_lie(w: Workspace) -> Expect:
    from safetensors.torch import save_file

    expect, first, _ = folder_merge(w)
    save_file(tensors(0, distinct_head=True), str(first / "model.safetensors"))
    expect.needles = (str(first / "config.json"), "ties lm_head.weight to transformer.wte.weight",
                      str(first / "model.safetensors"))
    return expect


@case("config without architectures ties by default, the input's lm_head differs")
def _tie_default(w: Workspace) -> Expect:
    from safetensors.torch import save_file

    config = {"model_type": "gpt2"}
    expect, first, second = folder_merge(w, config=config)
    for folder, seed in ((first, 0), (second, 1)):
        save_file(tensors(seed, distinct_head=True), str(folder / "model.safetensors"))
    expect.needles = (str(first / "config.json"), "ties lm_head.weight")
    return expect


@case("a state-dict file with a distinct lm_head beside a folder whose config ties it")
def _tie_file(w: Workspace) -> Expect:
    from safetensors.torch import save_file

    first = model_folder(w, "m1", 0)
    loose = w.root / "finetune.safetensors"
    save_file(tensors(1, distinct_head=True), str(loose))
    return Expect(["merge", str(first), str(loose), "-o", f"{w.root / 'soup'}/"],
                  (str(first / "config.json"), str(loose), "lm_head.weight"), w.canary)


@case("folder output: a template holding 10,001 small files")
def _many_files(w: Workspace) -> Expect:
    expect, first, _ = folder_merge(w)
    for number in range(10_001):
        (first / f"note-{number:05d}.txt").write_bytes(b"")
    expect.needles = (str(first), "more than 10,000 small files")
    return expect
