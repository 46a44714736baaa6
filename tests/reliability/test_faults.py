"""Faults under load (issues 22 and 26): two writers of one output, a full disk under every writer, ``kill -9`` and
Ctrl-C mid-write or mid-publication, inputs modified or truncated while they are merged.

The promises: one writer wins whole and the other fails in one line; a full disk is one line and leaves nothing;
a killed run leaves nothing under the output's name (only ``.soupkit-tmp`` temporaries, which a later run
removes); a folder output appears by one rename, all of it or none; a changed input is named, never published
from, and a truncated one is an error, never SIGBUS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from soupkit.errors import CheckpointError, OutputError
from soupkit.io.atomic import OutputLock, OutputSet
from tests.conftest import snapshot

CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "tie_word_embeddings": True}


def model_folder(path: Path, seed: int, elements: int = 64, extra_files: int = 0) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"transformer.wte.weight": torch.randn(8, 4, generator=g), "big": torch.randn(elements, generator=g),
               "other": torch.randn(elements, generator=g)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    (path / "tokenizer_config.json").write_text("{}")
    for number in range(extra_files):
        (path / f"extra-{number:04d}.txt").write_text(str(number))
    return path


def pair(tmp_path: Path, elements: int = 64, extra_files: int = 0) -> list[Path]:
    return [model_folder(tmp_path / "in" / f"m{i}", i, elements, extra_files) for i in range(2)]


def one_line(result) -> str:
    assert "Traceback" not in result.err, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


OUTPUTS = {"file": ("soup.safetensors", ()), "shards": ("soup.safetensors", ("--shard-size", "300B")),
           "folder": ("soup/", ()), "pt": ("soup.pt", ())}


# ------------------------------------------------------------------------------------------ two writers


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_second_writer_of_a_locked_output_fails_in_one_line(kind: str, tmp_path: Path, cli) -> None:
    inputs = pair(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    name, extra = OUTPUTS[kind]
    target = out_dir / name.rstrip("/")
    lock = OutputLock(target)  # another process's merge, mid-write
    try:
        result = cli("merge", *inputs, "-o", out_dir / name, *extra)
    finally:
        lock.release()
    assert result.code == 2
    assert "another process is writing this output" in one_line(result) and str(target) in result.err
    assert leftovers(out_dir) == []


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """Without --force the publication never replaces what another process published while this one wrote."""
    target = tmp_path / "soup.safetensors"
    with pytest.raises(OutputError, match="soup.safetensors: output appeared while this one was written"):
        with OutputSet(replace=False) as files:
            files.open(target).write(b"ours")
            target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs" and leftovers(tmp_path) == ["soup.safetensors"]
    folder = tmp_path / "soupdir"
    with pytest.raises(OutputError, match="soupdir: output appeared"):
        with OutputSet(replace=False) as files:
            files.folder(folder)
            files.open(folder / "model.safetensors").write(b"ours")
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"theirs")
    assert (folder / "model.safetensors").read_bytes() == b"theirs"
    assert sorted(leftovers(tmp_path)) == ["soup.safetensors", "soupdir"]


DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    from soupkit.io import safetensors_io
    action = os.environ.get("FAULT")
    original = safetensors_io.SafetensorsWriter.write
    calls = [0]
    def write(self, key, chunk):
        calls[0] += 1
        if action == "kill" and calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "slow":
            time.sleep(0.5)
        return original(self, key, chunk)
    safetensors_io.SafetensorsWriter.write = write
    from soupkit.cli import main
    main(sys.argv[1:])
""")


def _driver(tmp_path: Path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


def _run(tmp_path: Path, args: list[object], fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    if fault:
        env["FAULT"] = fault
    return subprocess.Popen([sys.executable, str(_driver(tmp_path)), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow  # two real processes race for one output
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_two_processes_writing_one_output_one_wins_whole(kind: str, tmp_path: Path) -> None:
    inputs = pair(tmp_path, elements=200)
    name, extra = OUTPUTS[kind]
    out = tmp_path / name
    given = f"{out}/" if kind == "folder" else out
    runs = [_run(tmp_path, ["merge", *inputs, "-o", given, *extra], fault="slow") for _ in range(2)]
    results = [(run.wait(timeout=120), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and len(loser.strip().splitlines()) == 1, loser
    assert str(out).rstrip("/") in loser
    weights = out / "model.safetensors" if kind == "folder" else out
    soup = load_file(str(weights))
    expected = (load_file(str(inputs[0] / "model.safetensors"))["big"] + load_file(str(inputs[1] /
                                                                                     "model.safetensors"))["big"]) / 2
    assert torch.allclose(soup["big"], expected, atol=1e-6)
    assert [p for p in tmp_path.iterdir() if p.name.endswith((".soupkit-tmp", ".soupkit-lock"))] == []


# ------------------------------------------------------------------------------------------ kill -9


@pytest.mark.parametrize("kind", ["shards", "folder", "file"])
def test_kill_9_mid_write_leaves_nothing_under_the_output_name(kind: str, tmp_path: Path, cli) -> None:
    inputs = pair(tmp_path, elements=200)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    name, extra = OUTPUTS[kind]
    run = _run(tmp_path, ["merge", *inputs, "-o", out_dir / name, *extra], fault="kill")
    assert run.wait(timeout=120) == -signal.SIGKILL
    left = leftovers(out_dir)
    assert left and all(n.endswith((".soupkit-tmp", ".soupkit-lock")) for n in left), left
    result = cli("merge", *inputs, "-o", out_dir / name, *extra)  # a later run: cleans up, publishes
    assert result.code == 0, result.err
    assert not [n for n in leftovers(out_dir) if n.endswith((".soupkit-tmp", ".soupkit-lock"))]
    assert os.path.exists(out_dir / (name + ".index.json" if kind == "shards" else name))


def test_a_live_writers_temporaries_are_kept(tmp_path: Path) -> None:
    from soupkit.io.atomic import remove_stale_temporaries

    target = tmp_path / "soup.safetensors"
    live = tmp_path / f".soup.safetensors.{os.getppid()}-0123abcd.soupkit-tmp"
    dead = tmp_path / ".soup.safetensors.999999999-0123abcd.soupkit-tmp"
    other = tmp_path / ".other.safetensors.999999999-0123abcd.soupkit-tmp"
    for path in (live, dead, other):
        path.write_bytes(b"x")
    (tmp_path / ".soup.safetensors.999999998-0123abcd.soupkit-tmp").mkdir()
    removed = remove_stale_temporaries(target)
    assert sorted(p.name for p in removed) == sorted([dead.name, ".soup.safetensors.999999998-0123abcd.soupkit-tmp"])
    assert live.exists() and other.exists()


# ------------------------------------------------------------------------------------------ Ctrl-C, publication


@pytest.mark.slow  # 3,003 files copied
def test_ctrl_c_while_a_3003_file_folder_is_copied_leaves_nothing(tmp_path: Path, cli, monkeypatch) -> None:
    from soupkit.io import hf_folder

    inputs = pair(tmp_path, extra_files=3000)
    before = snapshot(tmp_path / "in")
    calls = [0]
    original = hf_folder.copy_small_file

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 165:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_folder, "copy_small_file", interrupted)
    result = cli("merge", *inputs, "-o", f"{tmp_path}/soup/")
    assert result.code == 130
    assert not (tmp_path / "soup").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "in"] == []
    assert snapshot(tmp_path / "in") == before
    monkeypatch.undo()
    assert cli("merge", *inputs, "-o", f"{tmp_path}/soup/").code == 0
    assert len(list((tmp_path / "soup").iterdir())) == 3003


def test_sigint_during_the_renames_is_delivered_after_them(tmp_path: Path, monkeypatch) -> None:
    """Shards and their index are renamed into place with SIGINT held: all of them, then the interrupt."""
    from soupkit.io import atomic

    original = atomic._publish_file

    def publish(tmp, target, replace):
        if target.name.endswith("00001-of-00003.safetensors"):
            os.kill(os.getpid(), signal.SIGINT)
        return original(tmp, target, replace)

    monkeypatch.setattr(atomic, "_publish_file", publish)
    names = ["soup-00001-of-00003.safetensors", "soup-00002-of-00003.safetensors",
             "soup-00003-of-00003.safetensors", "soup.safetensors.index.json"]
    with pytest.raises(KeyboardInterrupt):
        with OutputSet() as files:
            for name in names:
                files.open(tmp_path / name).write(b"x")
    assert leftovers(tmp_path) == names


def test_force_replaces_a_folder_whole(tmp_path: Path, cli) -> None:
    inputs = pair(tmp_path, elements=400)
    out = tmp_path / "soup"
    assert cli("merge", *inputs, "-o", f"{out}/", "--shard-size", "1KB").code == 0
    sharded = leftovers(out)
    assert "model.safetensors.index.json" in sharded
    result = cli("merge", *inputs, "-o", f"{out}/", "--force")
    assert result.code == 0, result.err
    assert leftovers(out) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob(".soup*"))


# ------------------------------------------------------------------------------------------ disk full


@pytest.fixture
def tiny_filesystem(tmp_path: Path):
    """A real 2 MB tmpfs (needs the right to mount; skipped where the process lacks it)."""
    target = tmp_path / "tiny"
    target.mkdir()
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(target)],
                                       capture_output=True).returncode != 0:
        pytest.skip("no right to mount a small tmpfs here")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_disk_full_on_a_real_tmpfs_for_every_writer(kind: str, tmp_path: Path, cli, tiny_filesystem: Path) -> None:
    inputs = pair(tmp_path, elements=400_000)  # 1.6 MB per tensor: the soup cannot fit in 2 MB
    before = snapshot(tmp_path / "in")
    name, extra = OUTPUTS[kind]
    if kind == "shards":
        extra = ("--shard-size", "1MB")
    result = cli("merge", *inputs, "-o", tiny_filesystem / name, *extra)
    assert result.code == 2, result.err
    line = one_line(result)
    assert "No space left on device" in line and str(tiny_filesystem / "soup") in line, line
    assert list(tiny_filesystem.iterdir()) == []
    assert snapshot(tmp_path / "in") == before


# ------------------------------------------------------------------------------------------ inputs changing


@pytest.mark.parametrize("change", ["append", "rewrite in place", "touch"])
def test_an_input_modified_while_merged_is_named(change: str, tmp_path: Path, cli, monkeypatch) -> None:
    from soupkit.io import safetensors_io

    inputs = pair(tmp_path, elements=400)
    victim = inputs[1] / "model.safetensors"
    original = safetensors_io.SafetensorsWriter.write
    done = [False]

    def write(self, key, chunk):
        if not done[0]:
            done[0] = True
            if change == "append":
                with open(victim, "ab") as handle:
                    handle.write(b"\0" * 8)
            elif change == "rewrite in place":
                data = bytearray(victim.read_bytes())
                data[-4:] = b"\x7f\x7f\x7f\x7f"
                with open(victim, "r+b") as handle:
                    handle.write(data)
            else:
                os.utime(victim, ns=(1, 1))
        return original(self, key, chunk)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", write)
    result = cli("merge", *inputs, "-o", f"{tmp_path}/soup/")
    assert result.code == 2
    line = one_line(result)
    assert str(victim) in line and "modified while it was being merged" in line, line
    assert not (tmp_path / "soup").exists()


def test_an_input_truncated_while_merged_is_an_error_not_sigbus(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for seed, path in enumerate((a, b)):
        save_file({"w": torch.randn(2_000_000, generator=torch.Generator().manual_seed(seed))}, str(path))
    script = tmp_path / "truncate.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from soupkit.io import safetensors_io
        original = safetensors_io.read_into
        def read_into(fd, buffer, offset, name):
            if name.endswith("b.safetensors") and offset > 1_000_000:
                os.truncate(name, 4096)
            return original(fd, buffer, offset, name)
        safetensors_io.read_into = read_into
        from soupkit.cli import main
        main(["merge", {str(a)!r}, {str(b)!r}, "-o", {str(tmp_path / 'soup.safetensors')!r}])
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "b.safetensors" in run.stderr and "truncated" in run.stderr
    assert not (tmp_path / "soup.safetensors").exists()


def test_watch_names_a_removed_input(tmp_path: Path) -> None:
    source = tmp_path / "in.safetensors"
    source.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="in.safetensors: input was removed while it was being merged"):
        with OutputSet() as files:
            files.watch([source])
            files.open(tmp_path / "out.safetensors").write(b"y")
            source.unlink()
    assert leftovers(tmp_path) == []


def test_small_atomic_writes_never_fail_on_each_other(tmp_path: Path) -> None:
    """Cache entries and reports: two writers at once both succeed, the last one wins whole (no lock)."""
    from soupkit.io.atomic import atomic_write_bytes

    target = tmp_path / "entry.json"
    held = OutputLock(tmp_path / "entry.json")  # even a merge-style lock on the same name does not block them
    try:
        with OutputSet(exclusive=False) as first:
            first.open(target).write(b"first")
            atomic_write_bytes(target, b"second")
    finally:
        held.release()
    assert target.read_bytes() == b"first" and leftovers(tmp_path) == ["entry.json"]
