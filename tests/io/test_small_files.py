"""Every reader of a model folder's small files opens only regular files inside the folder (soupkit.io.small_files):
a link out of the folder, a /proc file, a FIFO, a device or a folder under a small file's name is refused in one
line naming it, and its bytes never reach an output. Each hostile entry is tried on every reader: ties (config.json
of an input folder), folder outputs (copies), adapter configs, adapter outputs, the evaluation fingerprint and the
provenance fingerprint."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import soupkit
from soupkit.errors import CheckpointError, SoupkitError
from soupkit.io import open_checkpoint
from soupkit.io.small_files import (
    UnsafeFileError,
    copy_small_file,
    read_json_file,
    read_small_file,
)

SECRET = b"SECRET-TOKEN-4f1d"
CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "tie_word_embeddings": True}


def model_folder(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"transformer.wte.weight": torch.randn(5, 3, generator=g), "h.0.w": torch.randn(3, 3, generator=g)},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    (path / "tokenizer_config.json").write_text("{}")
    return path


def adapter_folder(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.h.0.lora_A.weight": torch.randn(2, 3, generator=g),
               "base_model.model.h.0.lora_B.weight": torch.randn(3, 2, generator=g)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                          "target_modules": ["h.0"]}))
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "id_rsa"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def _symlink(target: str | Path) -> Callable[[Path, str], None]:
    def make(folder: Path, name: str) -> None:
        (folder / name).unlink(missing_ok=True)
        os.symlink(target, folder / name)
    return make


def _relative_out(folder: Path, name: str) -> None:
    (folder / name).unlink(missing_ok=True)
    os.symlink("../outside/id_rsa", folder / name)


def _parent_link(folder: Path, name: str) -> None:
    (folder / name).unlink(missing_ok=True)
    os.symlink(folder.parent / "outside", folder / "sub")
    (folder.parent / "outside" / name).write_bytes(SECRET)
    os.symlink(f"sub/{name}", folder / name)


def _fifo(folder: Path, name: str) -> None:
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)


def _folder(folder: Path, name: str) -> None:
    (folder / name).unlink(missing_ok=True)
    (folder / name).mkdir()


def _device(folder: Path, name: str) -> None:
    (folder / name).unlink(missing_ok=True)
    try:
        os.mknod(folder / name, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("creating a device node needs root")


def _huge(folder: Path, name: str) -> None:
    with open(folder / name, "wb") as handle:  # sparse: 300 MiB claimed, nothing on disk
        handle.truncate(300 * 2**20)


HOSTILE: dict[str, Callable[[Path, str], None]] = {
    "absolute link to a 0600 file": lambda f, n: _symlink(f.parent / "outside" / "id_rsa")(f, n),
    "relative ../ link": _relative_out,
    "link to /proc/self/environ": _symlink("/proc/self/environ"),
    "link to /proc/self/pagemap": _symlink("/proc/self/pagemap"),
    "link to /dev/zero": _symlink("/dev/zero"),
    "link through a linked subfolder": _parent_link,
    "dangling link": _symlink("nowhere.json"),
    "FIFO": _fifo,
    "device node": _device,
    "folder under the name": _folder,
    "sparse 300 MiB file": _huge,
}


def _no_secret_under(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and "outside" not in path.parts:
            assert SECRET not in path.read_bytes(), path


# ------------------------------------------------------------------------------------------ the one reader


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_reader_refuses_every_hostile_entry(kind: str, tmp_path: Path, secret: Path) -> None:
    folder = model_folder(tmp_path / "m")
    HOSTILE[kind](folder, "special_tokens_map.json")
    with pytest.raises(UnsafeFileError, match=r"m/special_tokens_map.json: "):
        read_small_file(folder, "special_tokens_map.json")


def test_reader_reads_files_inside_and_the_hf_cache_layout(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    (folder / "inner").mkdir()
    (folder / "inner" / "tok.json").write_text('{"a": 1}')
    os.symlink("inner/tok.json", folder / "tokenizer.json")
    assert read_json_file(folder, "tokenizer.json") == {"a": 1}
    assert read_small_file(folder, "absent.json") is None
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text('{"b": 2}')
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    os.symlink("../../blobs/abc123", snapshot / "config.json")
    assert read_json_file(snapshot, "config.json") == {"b": 2}
    os.symlink("../../../outside.json", snapshot / "escape.json")  # out of the repo's blobs: refused
    (tmp_path / "outside.json").write_text("{}")
    with pytest.raises(UnsafeFileError, match="outside the folder"):
        read_small_file(snapshot, "escape.json")


def test_hard_link_is_a_regular_file_inside_and_copies_keep_the_source_mode(tmp_path: Path) -> None:
    """A hard link's name lies in the folder and it is a regular file: read like any other (the kernel's
    protected_hardlinks stops linking a file one could not read); a copy never gets wider permissions."""
    folder = model_folder(tmp_path / "m")
    private = tmp_path / "private.json"
    private.write_text('{"p": 1}')
    private.chmod(0o600)
    os.link(private, folder / "tokenizer.json")
    out = tmp_path / "copy"
    with open(out, "wb") as handle:
        mode = copy_small_file(folder, "tokenizer.json", handle)
    assert mode == 0o600 and out.read_text() == '{"p": 1}'


# ------------------------------------------------------------------------------------------ every reader


def _ties(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    folder = model_folder(tmp_path / "m")
    return folder, lambda: open_checkpoint(folder)


def _folder_output(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    first, second = model_folder(tmp_path / "m"), model_folder(tmp_path / "m2", seed=1)
    return first, lambda: soupkit.merge([first, second], "uniform", f"{tmp_path}/soup/")


def _adapter_config(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    folder = adapter_folder(tmp_path / "m")
    return folder, lambda: open_checkpoint(folder)


def _adapter_output(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    first, second = adapter_folder(tmp_path / "m"), adapter_folder(tmp_path / "m2", seed=1)
    (first / "tokenizer_config.json").write_text("{}")
    return first, lambda: soupkit.merge([first, second], "uniform", f"{tmp_path}/soup/")


def _eval_fingerprint(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    from soupkit.eval.models.transformers_models import folder_fingerprint

    folder = model_folder(tmp_path / "m")
    return folder, lambda: folder_fingerprint(folder)


def _provenance_fingerprint(tmp_path: Path) -> tuple[Path, Callable[[], object]]:
    from soupkit.io.provenance import fingerprint

    folder = model_folder(tmp_path / "m")
    return folder, lambda: fingerprint(folder)


READERS = {"ties": (_ties, "config.json"), "folder output": (_folder_output, "tokenizer_config.json"),
           "folder output config": (_folder_output, "config.json"),
           "adapter config": (_adapter_config, "adapter_config.json"),
           "adapter output": (_adapter_output, "tokenizer_config.json"),
           "eval fingerprint": (_eval_fingerprint, "special_tokens_map.json"),
           "provenance fingerprint": (_provenance_fingerprint, "added_tokens.json")}
_LINKS_OUT = ["absolute link to a 0600 file", "relative ../ link", "link to /proc/self/environ",
              "link to /proc/self/pagemap", "link through a linked subfolder", "FIFO", "folder under the name",
              "device node"]


@pytest.mark.parametrize("kind", _LINKS_OUT)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_refuses_links_out(reader: str, kind: str, tmp_path: Path, secret: Path) -> None:
    make, name = READERS[reader]
    folder, run = make(tmp_path)
    if kind == "folder under the name" and reader == "provenance fingerprint":
        pytest.skip("a subfolder is not part of a folder's fingerprint")
    if kind in ("FIFO", "device node") and reader == "provenance fingerprint":
        pytest.skip("the provenance fingerprint reads regular files only; a FIFO or device is not opened")
    HOSTILE[kind](folder, name)
    with pytest.raises(SoupkitError, match=rf"m/{name}: "):
        run()
    assert not (tmp_path / "soup").exists()
    _no_secret_under(tmp_path)


def test_folder_output_copies_small_files_faithfully(tmp_path: Path) -> None:
    first, second = model_folder(tmp_path / "m"), model_folder(tmp_path / "m2", seed=1)
    big = os.urandom(1 << 20) * 70  # a 70 MB tokenizer.json is copied, not dropped
    (first / "tokenizer.json").write_bytes(big)
    (first / "inner").mkdir()
    (first / "inner" / "merges.txt").write_text("a b\n")
    os.symlink("inner/merges.txt", first / "merges.txt")  # a link inside the folder is copied as a file
    soupkit.merge([first, second], "uniform", f"{tmp_path}/soup/")
    out = tmp_path / "soup"
    assert (out / "tokenizer.json").read_bytes() == big
    assert not (out / "merges.txt").is_symlink() and (out / "merges.txt").read_text() == "a b\n"
    assert not (out / "inner").exists()


def test_a_0600_config_is_copied_0600(tmp_path: Path) -> None:
    first, second = model_folder(tmp_path / "m"), model_folder(tmp_path / "m2", seed=1)
    (first / "tokenizer_config.json").chmod(0o600)
    soupkit.merge([first, second], "uniform", f"{tmp_path}/soup/")
    assert stat.S_IMODE((tmp_path / "soup" / "tokenizer_config.json").stat().st_mode) & 0o077 == 0


def test_cli_names_the_file_in_one_line(tmp_path: Path, secret: Path, cli) -> None:
    first, second = model_folder(tmp_path / "m"), model_folder(tmp_path / "m2", seed=1)
    os.symlink("/proc/self/environ", first / "special_tokens_map.json")
    result = cli("merge", str(first), str(second), "-o", f"{tmp_path}/soup/")
    assert result.code == 2 and "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "m/special_tokens_map.json: is a symlink to a file outside the folder" in lines[0]
    assert not (tmp_path / "soup").exists()


def test_truncated_config_is_refused_not_replaced(tmp_path: Path) -> None:
    first, second = model_folder(tmp_path / "m"), model_folder(tmp_path / "m2", seed=1)
    (first / "config.json").write_text(json.dumps(CONFIG)[:20])
    with pytest.raises(CheckpointError, match=r"m/config.json: not valid JSON"):
        soupkit.merge([first, second], "uniform", f"{tmp_path}/soup/", dtype="bf16")
    assert not (tmp_path / "soup").exists()
