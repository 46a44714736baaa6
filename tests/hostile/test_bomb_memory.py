"""Peak memory of the checkpoint bombs (``corpus_bombs.BOMBS``): each is refused within bounded memory and I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.child_peak import peak
from tests.hostile.corpus import Workspace
from tests.hostile.corpus_bombs import BOMBS
from tests.hostile.test_corpus import build

# --- peak memory of the bombs ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_bombs_stay_within_bounded_memory_and_time(tmp_path: Path) -> None:
    """Every bomb in the corpus, run through the CLI in one process: peak RSS stays within 300 MB of a plain
    small merge in another process (torch's own footprint cancels out), and all of them read and write little
    more than the plain merge (no bomb is read through or expanded on disk)."""
    argvs = []
    for number, name in enumerate(BOMBS):
        argvs.append(build(name, tmp_path / f"bomb{number}").argv)
    w = Workspace(tmp_path / "plain")
    w.root.mkdir()
    plain = [["merge", str(w.good("a.safetensors", 1)), str(w.good("b.safetensors", 2)), "-o", w.out]]
    baseline = peak(plain, tmp_path)
    bombs = peak(argvs, tmp_path)
    assert baseline["codes"] == [0] and bombs["codes"] == [2] * len(BOMBS), bombs
    assert bombs["rss_kb"] - baseline["rss_kb"] < 300_000, (bombs, baseline)
    assert bombs["io_bytes"] - baseline["io_bytes"] < 64 << 20, (bombs, baseline)
