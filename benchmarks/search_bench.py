"""Merge-search benchmark: candidates per second, and the held-out examples the exact early stop saves.

On the demo's ingredients (``soupkit demo --quick`` is run first into the work folder if they are missing),
runs ``soupkit.search`` over TIES (weights, densities, scaling) twice in one process with the same seed and
budget: with the exact early stop, and scoring every candidate in full (``early_stop=False``). Prints, for each,
candidates per second (median of ``--repeat`` runs), held-out examples evaluated, and the fraction saved; both
runs must agree on which candidate is the best so far wherever the full run's decision is known (the early
stop never keeps a candidate a full evaluation would reject). No score cache (every candidate scored afresh).

    python benchmarks/search_bench.py [--budget 40] [--repeat 3] [--workdir DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="search-bench-"))
    demo = work / "demo"
    if not (demo / "pretrained.safetensors").exists():
        subprocess.run([sys.executable, "-m", "soupkit", "demo", "--quick", "--out", str(demo), "--device",
                        args.device], check=True, capture_output=True)
    import torch

    from soupkit.eval import Evaluator
    from soupkit.soups.merge_search import search

    torch.set_num_threads(1)
    paths = sorted((demo / "ingredients").glob("*.safetensors"))
    evaluator = Evaluator.from_recipe(demo / "recipe.yaml", device=args.device, use_cache=False)
    search(paths, "ties", evaluator, base=demo / "pretrained.safetensors", budget=2, compare=False)  # warm-up
    rows = {}
    for label, early in (("exact early stop", True), ("every candidate in full", False)):
        rates, result = [], None
        for _ in range(args.repeat):
            started = time.perf_counter()
            result = search(paths, "ties", evaluator, base=demo / "pretrained.safetensors", budget=args.budget,
                            seed=0, early_stop=early, compare=False)
            rates.append(args.budget / (time.perf_counter() - started))
        rows[label] = (statistics.median(rates), result)
    print(f"# search_bench: {platform.node()} {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {len(paths)} ingredients, budget {args.budget}, median of {args.repeat}")
    print("| run | candidates/s | held-out examples evaluated | saved | best held-out |")
    print("|---|---|---|---|---|")
    for label, (rate, result) in rows.items():
        stats = result.stats
        print(f"| {label} | {rate:.2f} | {stats['examples_evaluated']:,} of {stats['examples_full']:,} | "
              f"{100 * stats['examples_saved_fraction']:.0f}% | {100 * result.best.score:.2f}% |")
    early, full = rows["exact early stop"][1], rows["every candidate in full"][1]
    assert full.candidates[0].correct == early.candidates[0].correct
    print(f"speed-up of the early stop: {rows['exact early stop'][0] / rows['every candidate in full'][0]:.2f}x")


if __name__ == "__main__":
    main()
