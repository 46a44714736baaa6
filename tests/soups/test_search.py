"""Merge search (``soupkit.search`` / ``soupkit search``) on the real Evaluator: CMA-ES over a method's declared
parameters, exact early stop, the config that reproduces the result bit for bit, resume, interruption, per-layer
groups and one-line errors. Work is counted (candidates, examples, forward passes), never timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from soupkit.soups.merge_search import layer_groups, search
from tests.conftest import snapshot
from tests.soups.test_with_evaluator import recipe


@pytest.fixture
def evaluator(tmp_path):
    from soupkit.eval import Evaluator

    return Evaluator.from_recipe(recipe(batch_size=30), cache_dir=tmp_path / "cache")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_search_beats_or_equals_the_defaults_and_its_config_reproduces_it(cnn_ingredients, evaluator, tmp_path,
                                                                           cli):
    paths = cnn_ingredients[1:5]
    out = tmp_path / "out" / "best.safetensors"
    result = search(paths, "ties", evaluator, base=cnn_ingredients[0], budget=14, seed=0, compare=True, output=out)
    defaults = result.candidates[0]
    assert defaults.point is None and defaults.parameters == {}
    assert result.best.correct >= defaults.correct  # the defaults are a candidate: never worse on held-out
    assert len(result.candidates) == 14 and result.best.best
    # the searched row of the table is the best candidate, scored in full on every set
    searched = result.table["ties searched"]
    assert searched[evaluator.heldout_name] == pytest.approx(result.best.score)
    assert {"best ingredient", "uniform soup", "ties defaults"} <= set(result.table)
    assert any(label.startswith("greedy soup") for label in result.table)
    # the written config reproduces the written merge, bit for bit, through the CLI
    config = yaml.safe_load(result.config_path.read_text())
    assert config["method"] == "ties" and config["parameters"] == result.best.parameters
    again = tmp_path / "again.safetensors"
    run = cli("merge", "--config", result.config_path, "-o", again, "-q")
    assert run.code == 0, run.err
    assert _same(_tensors(out), _tensors(again))
    report = json.loads((out.parent / "best.search.json").read_text())
    assert report["best"]["index"] == result.best.index and report["stats"]["candidates"] == 14
    assert (out.parent / "best.search.png").stat().st_size > 0


def test_early_stop_decides_exactly_as_full_evaluation(cnn_ingredients, evaluator):
    paths = cnn_ingredients[:4]
    result = search(paths, "linear", evaluator, budget=12, seed=1, compare=False)
    stopped = [c for c in result.candidates if c.stopped_early]
    assert stopped, "no candidate stopped early: the test would prove nothing"
    assert result.stats["examples_evaluated"] < result.stats["examples_full"]
    best_so_far = None
    from soupkit.merging.config import merge_from_config

    for c in result.candidates:
        if c.stopped_early:
            config = {"method": "linear", "models": [str(p) for p in paths], "parameters": c.parameters}
            full = evaluator.evaluate(merge_from_config(config), [evaluator.heldout_name],
                                      use_cache=False).datasets[evaluator.heldout_name]
            assert full.correct <= best_so_far, f"candidate {c.index} was stopped but beats the best"
            assert -c.fitness >= full.correct / full.n  # the fitness CMA-ES saw is a true upper bound
        elif best_so_far is None or c.correct > best_so_far:
            best_so_far = c.correct
    assert result.best.correct == best_so_far
    full = search(paths, "linear", evaluator, budget=12, seed=1, compare=False, early_stop=False)
    assert not any(c.stopped_early for c in full.candidates)
    assert full.candidates[0].correct == result.candidates[0].correct


class Interrupting:
    """The evaluator, interrupted (as Ctrl-C would) at its ``at``-th evaluation."""

    def __init__(self, evaluator, at: int):
        self.inner, self.at, self.calls = evaluator, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def evaluate(self, source, datasets=None, *, need_correct=None, order=None, use_cache=None, progress=False):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.evaluate(source, datasets, need_correct=need_correct, order=order, use_cache=use_cache,
                                   progress=progress)


def test_interrupted_search_writes_nothing_and_resumes_to_the_same_result(cnn_ingredients, evaluator, tmp_path):
    paths = cnn_ingredients[:3]
    out = tmp_path / "best.safetensors"
    before = snapshot(paths[0].parent)
    with pytest.raises(KeyboardInterrupt):
        search(paths, "linear", Interrupting(evaluator, 6), budget=10, seed=2, compare=False, output=out)
    assert not out.exists() and not (tmp_path / "best.search.yaml").exists()
    log = tmp_path / "best.search.jsonl"
    assert len(log.read_text().splitlines()) == 1 + 5  # the header and the five candidates scored
    passes = evaluator.forward_passes
    resumed = search(paths, "linear", evaluator, budget=10, seed=2, compare=False, output=out, resume=True)
    fresh = search(paths, "linear", evaluator, budget=10, seed=2, compare=False, early_stop=True)
    assert [c.point for c in resumed.candidates] == [c.point for c in fresh.candidates]
    assert [c.correct for c in resumed.candidates] == [c.correct for c in fresh.candidates]
    assert resumed.best.parameters == fresh.best.parameters
    assert evaluator.forward_passes > passes
    assert out.exists() and snapshot(paths[0].parent) == before


def test_resume_refuses_another_search_and_a_new_run_refuses_an_old_log(cnn_ingredients, evaluator, tmp_path):
    from soupkit.errors import ParameterError

    paths = cnn_ingredients[:3]
    out = tmp_path / "best.safetensors"
    search(paths, "linear", evaluator, budget=3, compare=False, output=out)
    out.unlink()  # the log stays: a new run must not silently replace it
    with pytest.raises(ParameterError, match="a search log exists"):
        search(paths, "linear", evaluator, budget=3, compare=False, output=out)
    with pytest.raises(ParameterError, match="log of another search"):
        search(paths, "linear", evaluator, budget=5, seed=9, compare=False, output=out, resume=True, force=True)


def test_per_layer_groups_follow_the_names():
    keys = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up.weight",
            "model.layers.1.self_attn.q_proj.weight", "model.layers.10.mlp.up.weight", "model.norm.weight",
            "lm_head.weight", "cls_token", "blocks.2.attn.qkv.weight", "conv1.weight", "conv1.bias"]
    groups = dict(layer_groups(keys))
    assert groups["model.layers.0.*"] == keys[1:3]
    assert groups["model.layers.1.*"] == [keys[3]] and groups["model.layers.10.*"] == [keys[4]]
    assert groups["model.norm.*"] == ["model.norm.weight"] and groups["lm_head.*"] == ["lm_head.weight"]
    assert groups["cls_token"] == ["cls_token"] and groups["blocks.2.*"] == [keys[8]]
    assert groups["conv1.*"] == ["conv1.weight", "conv1.bias"]


def test_per_layer_search_writes_tensor_rules_that_reproduce_it(cnn_ingredients, evaluator, tmp_path, cli):
    paths = cnn_ingredients[1:4]
    out = tmp_path / "layers.safetensors"
    result = search(paths, "task_arithmetic", evaluator, base=cnn_ingredients[0], budget=6, per_layer=True,
                    parameters=["scaling"], compare=False, output=out)
    groups = {d.group for d in result.dimensions}
    assert len(groups) > 1 and None not in groups
    config = yaml.safe_load(result.config_path.read_text())
    assert {rule["match"] for rule in config.get("tensors", [])} <= groups
    again = tmp_path / "again.safetensors"
    assert cli("merge", "--config", result.config_path, "-o", again, "-q").code == 0
    assert _same(_tensors(out), _tensors(again))


@pytest.mark.parametrize("args, needle", [
    ([], "--eval"),
    (["-e", "R", "--search", "nope"], "--search"),
    (["-e", "R", "--range", "weights=1"], "--range"),
    (["-e", "R", "--range", "weights=-1:1"], "--range weights"),
    (["-e", "R", "--budget", "0"], "--budget"),
    (["-e", "R", "--resume"], "--resume"),
    (["-e", "R", "-m", "nosuch"], "nosuch"),
    (["-e", "R", "-m", "ties"], "base"),
    (["-e", "R", "--weights", "1,1", "--search", "weights"], "--weights"),
])
def test_cli_errors_are_one_line_with_no_output(cnn_ingredients, tmp_path, cli, args, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe()))
    args = [str(path) if a == "R" else a for a in args]
    out = tmp_path / "o" / "best.safetensors"
    out.parent.mkdir()
    before = snapshot(cnn_ingredients[0].parent)
    run = cli("search", *cnn_ingredients[:2], *args, "-o", out, "-q")
    assert run.code == 2 and len(run.err.strip().splitlines()) == 1, run.err
    assert needle in run.err and "Traceback" not in run.err
    assert list(out.parent.iterdir()) == []
    assert snapshot(cnn_ingredients[0].parent) == before


def test_search_on_a_transformers_multiple_choice_task(tmp_path):
    from soupkit.eval import Evaluator
    from tests.eval.text_models import lm_recipe, make_causal_lm

    kit = make_causal_lm(tmp_path / "lm")
    judge = Evaluator.from_recipe(lm_recipe(kit), cache_dir=tmp_path / "cache")
    result = search(kit.finetunes, "task_arithmetic", judge, base=kit.base, budget=6, seed=0, compare=False)
    assert result.best.correct >= result.candidates[0].correct
    assert result.candidates[0].n == 40


@pytest.mark.distributed
def test_two_gloo_processes_search_as_one(cnn_ingredients, tmp_path):
    """Under torchrun the evaluator shards every candidate (and runs it in full: no early stop across
    processes), so the search equals one process searching with ``early_stop=False``; rank 0 alone writes."""
    import os
    import subprocess
    import sys

    from soupkit.eval import Evaluator

    repo = Path(__file__).resolve().parents[2]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(batch_size=50)))
    out, report = tmp_path / "dist" / "best.safetensors", tmp_path / "report.json"
    out.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).with_name("search_worker.py")), str(path), str(out), str(report),
               str(tmp_path / "cache"), *map(str, cnn_ingredients[:3])]
    done = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(report.read_text())
    single = search(cnn_ingredients[:3], "linear", Evaluator.from_recipe(recipe(batch_size=50), use_cache=False),
                    budget=8, seed=3, compare=False, early_stop=False)
    assert got["world"] == 2 and got["group_still_held"] == 0
    assert got["correct"] == [c.correct for c in single.candidates]
    assert got["points"] == [c.point for c in single.candidates]
    assert got["best"] == single.best.parameters
    assert _same(_tensors(out), single.state_dict)
    assert sorted(p.name for p in out.parent.iterdir()) == ["best.safetensors", "best.search.json",
                                                             "best.search.jsonl", "best.search.png",
                                                             "best.search.yaml"]
