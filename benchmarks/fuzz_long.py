"""Fuzz soupkit's checkpoint readers for a while: ``python benchmarks/fuzz_long.py --minutes 30``.

The CI runs a fixed few hundred mutants per seed (``tests/fuzz/test_fuzz_readers.py``); this runs random ones
until the time is up, keeps going after a finding, and writes each distinct finding (kind + where it was
raised) to ``benchmarks/_work/fuzz-findings/`` as the mutated file plus a text report. Exit status 1 if
anything was found. A finding is any outcome other than success or a one-line ``SoupkitError``: another
exception, a reader claiming a huge tensor from a tiny file, or a file appearing (a payload ran).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests.fuzz.mutations import Finding, Mutant, mutants, run_one, seeds  # noqa: E402


def signature(finding: Finding) -> str:
    """Findings with the same kind and innermost frame are one bug."""
    lines = [line for line in finding.detail.splitlines() if line.strip().startswith("File ")]
    where = lines[-1].strip() if lines else finding.detail.splitlines()[0][:120]
    return f"{finding.kind} | {finding.detail.splitlines()[0][:80] if not lines else ''}{where}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    parser.add_argument("--seed", action="append", help="only these seeds (repeatable); default all")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "_work" / "fuzz-findings")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="soupkit-fuzz-"))
    seed_files = seeds(folder / "CANARY")
    names = args.seed or sorted(seed_files)
    unknown = [n for n in names if n not in seed_files]
    if unknown:
        parser.error(f"unknown seed {unknown[0]!r}; available: {', '.join(sorted(seed_files))}")
    deadline = time.monotonic() + args.minutes * 60
    counts: Counter[str] = Counter()
    found: dict[str, tuple[Finding, Mutant, bytes]] = {}

    @settings(max_examples=500, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mutant=mutants(names))
    def round_(mutant: Mutant) -> None:
        if time.monotonic() > deadline:
            return
        counts["mutants"] += 1
        try:
            finding, data = run_one(mutant, seed_files, folder)
        except Exception:  # the harness itself (e.g. building the mutant) must not stop the run
            finding, data = Finding("harness", traceback.format_exc()), b""
        if finding is None:
            return
        counts[finding.kind] += 1
        key = signature(finding)
        if key not in found or len(data) < len(found[key][2]):
            found[key] = (finding, mutant, data)

    started = time.monotonic()
    while time.monotonic() < deadline:
        round_()
        rate = counts["mutants"] / max(time.monotonic() - started, 1e-9)
        print(f"\r{counts['mutants']:,} mutants ({rate:,.0f}/s), {len(found)} distinct findings", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)

    if found:
        args.out.mkdir(parents=True, exist_ok=True)
    for key, (finding, mutant, data) in sorted(found.items()):
        name = hashlib.sha256(key.encode()).hexdigest()[:12]
        suffix = seed_files[mutant.seed][0]
        (args.out / f"{name}{suffix}").write_bytes(data)
        (args.out / f"{name}.txt").write_text(f"{key}\n\nmutant: {mutant}\n\n{finding.kind}: {finding.detail}\n")
        print(f"- {key}\n  {args.out / name}{suffix}")
    print(f"{counts['mutants']:,} mutants in {time.monotonic() - started:,.0f} s; findings: "
          f"{dict((k, v) for k, v in counts.items() if k != 'mutants') or 'none'}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
