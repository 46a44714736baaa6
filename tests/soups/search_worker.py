"""Run under torchrun by test_search.py: a merge search whose candidates every rank scores on its shard; the
process group must be free once closed (see tests/eval/dist_worker.py)."""

from __future__ import annotations

import json
import os
import sys

import torch

from soupkit.eval import Evaluator
from soupkit.eval.evaluator import _destroy_process_group
from soupkit.soups.merge_search import search


def main(recipe: str, output: str, report: str, cache: str, *checkpoints: str) -> None:
    ev = Evaluator.from_recipe(recipe, cache_dir=cache)
    result = search(list(checkpoints), "linear", ev, budget=8, seed=3, compare=False, output=output)
    group = torch.distributed.group.WORLD
    _destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        with open(report, "w") as handle:
            json.dump({"world": ev.world, "correct": [c.correct for c in result.candidates],
                       "points": [c.point for c in result.candidates], "best": result.best.parameters,
                       "group_still_held": sys.getrefcount(group) - 2}, handle)  # 2: `group` and the call


if __name__ == "__main__":
    main(*sys.argv[1:])
