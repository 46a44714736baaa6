"""Peak memory of the adapter paths, measured in a child process (issue 26, class 5): a soup of lopsided adapters
re-factorised with ``--rank`` is reduced from the factors (never the d x k update), a dense merge that would
build d x k updates from small factors is refused before any work, and every adapter case of the bad-input
corpus, run in one child, stays within a bounded amount of memory.

Peak RSS is the child's VmHWM (Linux carries ``ru_maxrss`` over exec from the big pytest parent); the baseline is
the same CLI on a tiny adapter pair, so torch's and soupkit's own footprint cancel out. Memory is counted, not
time."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.adapter_memory import write_adapter
from benchmarks.child_peak import peak
from tests.hostile.corpus_adapters import ADAPTER_CASES
from tests.hostile.test_corpus import build

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")

@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> int:
    root = tmp_path_factory.mktemp("baseline")
    write_adapter(root / "a", 4, 8, 1, 1)
    write_adapter(root / "b", 4, 8, 1, 2)
    result = peak([["merge", str(root / "a"), str(root / "b"), "-o", str(root / "soup")]], root)
    assert result["codes"] == [0]
    return result["rss_kb"] * 1024


#: lopsided: factors 2 x 300k (2.3 MiB, fp32), updates 64 x 300k (73 MiB): the dense update is 32x a factor
ROWS, COLS, RANK = 64, 300_000, 2


@pytest.mark.slow  # a child process measures its peak memory
def test_rank_reduction_of_lopsided_adapters_never_builds_the_update(tmp_path: Path, baseline: int) -> None:
    write_adapter(tmp_path / "a", ROWS, COLS, RANK, 1)
    write_adapter(tmp_path / "b", ROWS, COLS, RANK, 2)
    result = peak([["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--rank", "3", "-o", str(tmp_path / "soup"),
                    "-q"]], tmp_path)
    assert result["codes"] == [0]
    above = result["rss_kb"] * 1024 - baseline
    factor, dense = 4 * RANK * COLS, 4 * ROWS * COLS
    # measured ~15x the largest factor (float64 QR of the stacked A^T, its output, the writer's buffer); one
    # dense update alone would be 32x, the old SVD of it ~5 of them
    assert above < 24 * factor < dense, (above / factor, above / 2**20)
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "soup" / "adapter_model.safetensors"))
    assert {tuple(t.shape) for t in written.values()} == {(3, COLS), (ROWS, 3)}


@pytest.mark.slow  # a child process measures its peak memory
def test_every_adapter_corpus_case_in_one_child_stays_within_bounded_memory(tmp_path: Path, baseline: int) -> None:
    """All adapter cases (2 MiB configs, 100k-deep JSON, catastrophic patterns, dense TIES of lopsided adapters,
    huge ranks) through the CLI in one process: every one exits 2, and the peak stays within 300 MB of a tiny
    merge (the rule's bound for files of a few KB is 1.5 GB)."""
    argvs = [build(name, tmp_path / f"case{number}").argv for number, name in enumerate(ADAPTER_CASES)]
    result = peak(argvs, tmp_path)
    assert result["codes"] == [2] * len(argvs), [n for n, c in zip(ADAPTER_CASES, result["codes"]) if c != 2]
    assert result["rss_kb"] * 1024 - baseline < 300 << 20, result
