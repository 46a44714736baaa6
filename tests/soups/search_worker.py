"""Run under torchrun by test_search.py: a merge search whose candidates every rank scores on its shard."""

from __future__ import annotations

import json
import os
import sys

from soupkit.eval import Evaluator
from soupkit.soups.merge_search import search


def main(recipe: str, output: str, report: str, cache: str, *checkpoints: str) -> None:
    ev = Evaluator.from_recipe(recipe, cache_dir=cache)
    result = search(list(checkpoints), "linear", ev, budget=8, seed=3, compare=False, output=output)
    if int(os.environ["RANK"]) == 0:
        with open(report, "w") as handle:
            json.dump({"world": ev.world, "correct": [c.correct for c in result.candidates],
                       "points": [c.point for c in result.candidates], "best": result.best.parameters}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
