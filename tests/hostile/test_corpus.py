"""Every bad input in the corpus gets the same treatment from the CLI: exit code 2, one line on stderr naming
the file (and key or option) at fault, no traceback, no output or temporary file, inputs byte-identical and no
payload run. Most cases run in-process (fast); a handful through the real ``soupkit`` executable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import snapshot
from tests.hostile.corpus import CASES, Expect, Workspace

SOUPKIT = Path(sys.executable).with_name("soupkit")


def build(name: str, folder: Path, request: pytest.FixtureRequest | None = None) -> Expect:
    folder.mkdir(parents=True, exist_ok=True)
    expect = CASES[name](Workspace(folder))
    if expect.pending:
        if request is None:
            pytest.skip(expect.pending)
        # strict: once the component lands the case passes, the xfail fails, and the mark must go
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=f"{expect.pending} yet"))
    return expect


def check(expect: Expect, code: int, err: str, before: dict[str, str], folder: Path) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    line = lines[0]
    assert code == 2, (code, line)
    assert line.startswith(f"soupkit {expect.argv[0]}: error: "), line
    for needle in expect.needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    for secret in expect.absent:
        assert secret not in line, f"{secret!r} echoed in {line!r}"
    assert snapshot(folder) == before, "an input changed or a file (output, temporary) was left behind"
    if expect.canary is not None:
        assert not expect.canary.exists(), "a hostile payload ran"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    from tests.hostile.corpus_bombs import ROUND2

    assert len(ROUND2) >= 60
    from tests.hostile.corpus_folders import FOLDERS

    assert len(FOLDERS) >= 30
    from tests.hostile.corpus_adapters import ADAPTER_CASES

    assert len(ADAPTER_CASES) >= 35 and len(set(ADAPTER_CASES)) == len(ADAPTER_CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, tmp_path: Path, cli, request: pytest.FixtureRequest) -> None:
    folder = tmp_path / "case"
    expect = build(name, folder, request)
    before = snapshot(folder)
    result = cli(*expect.argv)
    check(expect, result.code, result.err, before, folder)


#: file-level cases whose bad file is also fed to `inspect` and `convert` on its own
READER_CASES = sorted(
    name for name in CASES
    if name.startswith(("empty", "random bytes", "safetensors ", ".pt ", "legacy ", "pickle holding", "hostile "))
    and "handwritten" not in name and "--base" not in name and "inspect" not in name and "convert" not in name
)


@pytest.mark.parametrize("command", ["inspect", "convert"])
@pytest.mark.parametrize("name", READER_CASES)
def test_bad_file_through_inspect_and_convert(name: str, command: str, tmp_path: Path, cli) -> None:
    folder = tmp_path / "case"
    expect = build(name, folder)
    bad = expect.argv[2]  # merge GOOD BAD -o OUT
    argv = ["inspect", bad] if command == "inspect" else ["convert", bad, str(folder / "converted.safetensors")]
    before = snapshot(folder)
    result = cli(*argv)
    check(Expect(argv, expect.needles, expect.canary), result.code, result.err, before, folder)


#: a handful of cases through the real executable, all at once (each pays torch's import time)
SUBPROCESS_CASES = ["hostile os.system (pickle)", "hostile handwritten getattr(builtins, 'eval')",
                    "safetensors data cut", "shape mismatch", "output equal to an input", "--dtype fp8",
                    "index shard path escapes the folder (../x.safetensors)", "FIFO as an input (pipe.safetensors)",
                    ".pt data.pkl bzip2 bomb (8 MiB from a few bytes)"]


@pytest.mark.slow  # each process pays torch's import; the default `pytest -q` still runs it
@pytest.mark.skipif(not SOUPKIT.exists(), reason="the soupkit console script is not installed beside python")
def test_bad_inputs_through_the_real_executable(tmp_path: Path) -> None:
    runs = []
    for number, name in enumerate(SUBPROCESS_CASES):
        folder = tmp_path / f"case{number}"
        expect = build(name, folder)
        before = snapshot(folder)
        process = subprocess.Popen([str(SOUPKIT), *expect.argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=folder, env={**os.environ, "COLUMNS": "200"})
        runs.append((name, expect, before, folder, process))
    for name, expect, before, folder, process in runs:
        _, err = process.communicate(timeout=120)
        try:
            check(expect, process.returncode, err, before, folder)
        except AssertionError as failure:
            raise AssertionError(f"{name}: {failure}") from None


def test_unwritable_output_directory(tmp_path: Path, cli, readonly_dir: Path) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    w = Workspace(folder)
    a, b = w.good("a.safetensors", 1), w.good("b.safetensors", 2)
    target = readonly_dir / "soup.safetensors"
    before, before_ro = snapshot(folder), snapshot(readonly_dir)
    result = cli("merge", a, b, "-o", target)
    check(Expect(["merge"], (str(target), "not writable")), result.code, result.err, before, folder)
    assert snapshot(readonly_dir) == before_ro


@pytest.fixture
def readonly_dir(tmp_path: Path):
    """A directory this process cannot create files in: chmod for ordinary users; for root (who ignores
    permission bits) a read-only tmpfs mounted over it."""
    target = tmp_path / "readonly"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
        return
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)],
                                       capture_output=True).returncode != 0:
        pytest.skip("running as root without the right to mount: no way to make a directory unwritable")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)
