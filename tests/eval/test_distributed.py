"""torchrun: two real gloo processes, each scoring its shard, give exactly the single-process results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from soupkit.eval import Evaluator
from tests.eval.helpers import digits_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_two_gloo_processes_equal_one(trained, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(digits_recipe(batch_size=50)))
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).with_name("dist_worker.py")), str(recipe), str(out), str(tmp_path / "cache"),
               *map(str, trained.paths)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2 and got["backend"] == "gloo" and got["cached_again"]
    assert got["group_still_held"] == 0  # pinned past destroy, its threads abort the process at exit

    single = Evaluator.from_recipe(recipe, use_cache=False)
    total = sum(single.num_examples(n) for n in single.dataset_names)
    assert got["local_examples"] == total // 2 or abs(got["local_examples"] - total / 2) <= len(single.dataset_names)
    for path, row in zip(trained.paths, got["rows"]):
        result = single(path)
        for name in single.dataset_names:
            expected = result[name]
            assert row[name]["correct"] == expected.correct and row[name]["n"] == expected.n
            assert row[name]["mask"] == expected.correct_mask.int().tolist()
            assert row[name]["loss"] == pytest.approx(expected.loss, rel=1e-6)
            assert not row[name]["cached"]
