"""Fuzz the checkpoint readers (bytes -> ``open_checkpoint`` -> every tensor) from mutated valid and hostile
seeds. In CI: a fixed, derandomised budget per seed (well under a minute in all); for longer runs:
``benchmarks/fuzz_long.py --minutes N``. Deselect with ``-m 'not slow'``."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz.mutations import Mutant, mutants, run_one, seeds

CANARY = "CANARY"
#: examples per seed in CI
EXAMPLES = 400


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, bytes]]]:
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, seeds(folder / CANARY)


SEED_NAMES = sorted(seeds(Path("/nonexistent") / CANARY))


def test_seeds_are_read_or_refused(workspace) -> None:
    """Unmutated: valid seeds read cleanly, hostile ones are refused; nothing runs."""
    folder, seed_files = workspace
    for name in SEED_NAMES:
        finding, _ = run_one(Mutant(name, "bytes", ()), seed_files, folder)
        assert finding is None, (name, finding)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEED_NAMES)
def test_fuzz_reader(seed: str, workspace) -> None:
    folder, seed_files = workspace

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutant=mutants([seed]))
    def fuzz(mutant: Mutant) -> None:
        finding, _ = run_one(mutant, seed_files, folder)
        assert finding is None, f"{finding.kind}: {finding.detail}\nmutant: {mutant}"

    fuzz()
