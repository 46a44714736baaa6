"""Run under torchrun by test_distributed.py and test_transformers.py: every rank evaluates its shard; rank 0
writes the results, after closing the process group and checking nothing else still holds it (a group pinned past
destroy_process_group keeps its worker threads into interpreter shutdown, where they abort the process)."""

from __future__ import annotations

import json
import os
import sys

import torch

from soupkit.eval import Evaluator
from soupkit.eval.evaluator import _destroy_process_group


def main(recipe: str, output: str, cache: str, *checkpoints: str) -> None:
    ev = Evaluator.from_recipe(recipe, cache_dir=cache)
    rows = []
    for path in checkpoints:
        result = ev(path)
        rows.append({name: {"correct": r.correct, "n": r.n, "loss": r.loss, "cached": r.cached,
                            "mask": None if r.correct_mask is None else r.correct_mask.int().tolist(),
                            "values": None if r.values is None else r.values.tolist()}
                     for name, r in result.datasets.items()})
    local = sum(len(y) for name in ev.dataset_names for _, y in ev.batches(name))
    again = ev(checkpoints[0])  # every rank must agree the cache holds it
    backend, group = torch.distributed.get_backend(), torch.distributed.group.WORLD
    _destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        with open(output, "w") as handle:
            json.dump({"rows": rows, "local_examples": local, "world": ev.world,
                       "cached_again": all(r.cached for r in again.datasets.values()), "backend": backend,
                       "group_still_held": sys.getrefcount(group) - 2}, handle)  # 2: `group` and the call


if __name__ == "__main__":
    main(*sys.argv[1:])
