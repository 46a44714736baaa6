"""The Evaluator on the digits CNN: per-example correctness against a hand computation, the score cache, exact
early stopping, strict in-place weight loading, batches, class subsets and the result objects."""

from __future__ import annotations

import json
import math

import pytest
import torch

from soupkit.errors import CheckpointError, ParameterError
from soupkit.eval import DatasetResult, EvalResult, Evaluator, as_score
from soupkit.eval.data.digits import load_digits_split
from tests.eval.helpers import digits_recipe, make_model


def reference(state: dict[str, torch.Tensor], split: str, shift: str | None = None) -> tuple[torch.Tensor, float]:
    """Per-example correctness and mean loss computed by hand: the model on the whole split at once."""
    model = make_model()
    model.load_state_dict(state)
    x, y = load_digits_split(split, shift)
    with torch.no_grad():
        logits = model.eval()(x)
    return logits.argmax(1) == y, float(torch.nn.functional.cross_entropy(logits, y))


def test_scores_equal_a_hand_computation(trained, tmp_path):
    ev = Evaluator.from_recipe(digits_recipe(), cache_dir=tmp_path)
    assert ev.dataset_names == ["heldout", "clean", "noise"]
    assert ev.test_names == ["clean", "noise"] and ev.shift_names == ["noise"]
    for state, path in zip(trained.states, trained.paths):
        result = ev(path)
        for name, split, shift in (("heldout", "heldout", None), ("clean", "test", None), ("noise", "test", "noise")):
            mask, loss = reference(state, split, shift)
            got = result[name]
            assert torch.equal(got.correct_mask, mask) and got.correct_mask.device.type == "cpu"
            assert got.correct == int(mask.sum()) and got.n == len(mask) == ev.num_examples(name)
            assert got.accuracy == pytest.approx(mask.float().mean().item())
            assert got.loss == pytest.approx(loss, rel=1e-5)
            assert not got.stopped_early and got.examples_seen == got.n and not got.cached
    accuracies = {ev(p)["clean"].accuracy for p in trained.paths}
    assert len(accuracies) == 3  # the three checkpoints really differ, so the checks above mean something


def test_state_dict_and_path_give_the_same_result(trained, tmp_path):
    ev = Evaluator.from_recipe(digits_recipe(), use_cache=False)
    by_path, by_state = ev(trained.paths[2]), ev(trained.states[2])
    wrapped = Evaluator.from_recipe(digits_recipe(), cache_dir=tmp_path)({"epoch": 3, "state_dict": trained.states[2]})
    for name in ev.dataset_names:
        assert torch.equal(by_path[name].correct_mask, by_state[name].correct_mask)
        assert torch.equal(wrapped[name].correct_mask, by_state[name].correct_mask)


def test_second_evaluation_is_served_from_the_cache(trained, tmp_path):
    ev = Evaluator.from_recipe(digits_recipe(), cache_dir=tmp_path / "cache")
    first = ev(trained.paths[1])
    passes = ev.forward_passes
    assert passes == sum(math.ceil(ev.num_examples(n) / 64) for n in ev.dataset_names)
    second = ev(trained.paths[1])
    assert ev.forward_passes == passes  # no forward pass at all
    for name in ev.dataset_names:
        assert second[name].cached and not first[name].cached
        assert torch.equal(second[name].correct_mask, first[name].correct_mask)
        assert second[name].loss == pytest.approx(first[name].loss)
    # a fresh evaluator (a new process) reads the same files; in-memory state dicts are cached by content
    again = Evaluator.from_recipe(digits_recipe(), cache_dir=tmp_path / "cache")
    assert again(trained.paths[1])["clean"].cached and again.forward_passes == 0
    again(dict(trained.states[0]))
    passes = again.forward_passes
    assert again({k: v.clone() for k, v in trained.states[0].items()})["heldout"].cached
    assert again.forward_passes == passes
    # bypassing the cache scores again; a different checkpoint or recipe is a miss
    assert not ev.evaluate(trained.paths[1], use_cache=False)["heldout"].cached
    assert not ev(trained.paths[2])["heldout"].cached
    other = Evaluator.from_recipe(digits_recipe(data={"heldout": {"kind": "digits", "split": "heldout", "seed": 1}}),
                                  cache_dir=tmp_path / "cache")
    assert not other(trained.paths[1])["heldout"].cached


def test_corrupt_or_partial_cache_entries_are_misses(trained, tmp_path):
    ev = Evaluator.from_recipe(digits_recipe(), cache_dir=tmp_path)
    ev(trained.paths[2], ["heldout"])
    entries = list(tmp_path.rglob("*.json"))
    assert len(entries) == 1 and not list(tmp_path.rglob(".*tmp*"))  # written via temp file + rename
    entry = json.loads(entries[0].read_text())
    entry["correct"] += 1  # disagrees with its own mask
    entries[0].write_text(json.dumps(entry))
    assert not ev(trained.paths[2], ["heldout"])["heldout"].cached
    entries[0].write_text('{"truncated": ')
    assert not ev(trained.paths[2], ["heldout"])["heldout"].cached


@pytest.mark.parametrize("ckpt", [0, 2])
def test_early_stop_decides_exactly_as_a_full_evaluation(trained, ckpt, tmp_path):
    ev = Evaluator.from_recipe(digits_recipe(batch_size=16), use_cache=False)
    full = ev(trained.paths[ckpt], ["heldout"])["heldout"]
    for need in (0, 1, full.correct - 5, full.correct, full.correct + 1, full.correct + 40, full.n):
        passes = ev.forward_passes
        got = ev.evaluate(trained.states[ckpt], ["heldout"], need_correct=need)["heldout"]
        assert (not got.stopped_early and got.correct >= need) == (full.correct >= need)
        if got.stopped_early:
            assert got.accuracy is None and got.examples_seen < got.n == full.n
            assert got.correct + (full.n - got.examples_seen) < need
            assert ev.forward_passes - passes < math.ceil(full.n / 16)  # it did stop early
            assert torch.equal(got.correct_mask, full.correct_mask[: got.examples_seen])
        else:
            assert got.correct == full.correct and got.accuracy == full.accuracy
    assert as_score(ev.evaluate(trained.paths[ckpt], ["heldout"], need_correct=full.n + 1)) != as_score(full)


def test_an_example_order_changes_nothing_but_how_soon_a_loser_stops(trained):
    ev = Evaluator.from_recipe(digits_recipe(batch_size=16), use_cache=False)
    full = ev(trained.paths[0], ["heldout"])["heldout"]
    wrong_first = torch.sort(full.correct_mask.to(torch.int8), stable=True).indices  # its misses first
    for need in (full.correct, full.correct + 1):
        plain = ev.evaluate(trained.states[0], ["heldout"], need_correct=need)["heldout"]
        ordered = ev.evaluate(trained.states[0], ["heldout"], need_correct=need, order=wrong_first)["heldout"]
        reaches = [not r.stopped_early and r.correct >= need for r in (plain, ordered)]
        assert reaches == [need <= full.correct] * 2  # the same decision either way
        if need > full.correct:
            assert ordered.stopped_early and ordered.examples_seen < plain.examples_seen  # misses first: fails sooner
        else:
            assert ordered.correct == full.correct and torch.equal(ordered.correct_mask, full.correct_mask)
    with pytest.raises(ParameterError, match="permutation"):
        ev.evaluate(trained.states[0], ["heldout"], need_correct=1, order=wrong_first[:-1])
    with pytest.raises(ParameterError, match="need_correct"):
        ev.evaluate(trained.states[0], ["heldout"], order=wrong_first)


def test_early_stopped_results_are_not_cached(trained, tmp_path):
    ev = Evaluator.from_recipe(digits_recipe(batch_size=16), cache_dir=tmp_path)
    stopped = ev.evaluate(trained.paths[0], ["heldout"], need_correct=10_000)["heldout"]
    assert stopped.stopped_early and not list(tmp_path.rglob("*.json"))
    assert not ev.evaluate(trained.paths[0], ["heldout"])["heldout"].cached
    with pytest.raises(ParameterError, match="exactly one dataset"):
        ev.evaluate(trained.paths[0], need_correct=3)


def test_load_state_copies_in_place_and_checks_keys_and_shapes(trained):
    ev = Evaluator.from_recipe(digits_recipe(), use_cache=False)
    pointers = {n: p.data_ptr() for n, p in ev.model.named_parameters()}
    ev.load_state(trained.states[2])
    assert {n: p.data_ptr() for n, p in ev.model.named_parameters()} == pointers  # no reallocation
    for key, value in ev.model.state_dict().items():
        assert torch.equal(value, trained.states[2][key])
    bad = dict(trained.states[2])
    del bad["head.3.bias"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\) \('head.3.bias'\); unexpected 1 key\(s\) "
                                              r"\('extra.weight'\)"):
        ev.load_state(bad)
    wrong = {**trained.states[2], "head.3.weight": torch.zeros(5, 64)}
    with pytest.raises(CheckpointError, match=r"'head.3.weight' is \(5, 64\) but the model has \(10, 64\)"):
        ev.load_state(wrong)
    with pytest.raises(CheckpointError, match="missing.safetensors: no such"):
        ev(trained.paths[0].with_name("missing.safetensors"))


def test_batches_are_ready_model_inputs(trained):
    ev = Evaluator.from_recipe(digits_recipe(), use_cache=False)
    x, y = load_digits_split("heldout")
    got = list(ev.batches("heldout"))
    assert [len(b[1]) for b in got] == [64] * (len(y) // 64) + [len(y) % 64]
    assert torch.equal(torch.cat([b[0] for b in got]), x) and torch.equal(torch.cat([b[1] for b in got]), y)
    with pytest.raises(ParameterError, match="unknown dataset .* 'heldout'"):
        list(ev.batches("held_out"))


def test_class_subset_restricts_logits(trained):
    """Labels of a subset set index into ``class_subset``; the prediction is the best of those classes only."""
    subset = [3, 5, 7]
    recipe = digits_recipe(data={"heldout": {"kind": "tensors", "path": "subset.safetensors",
                                             "class_subset": subset}})
    x, y = load_digits_split("heldout")
    keep = torch.isin(y, torch.tensor(subset))
    labels = torch.tensor([subset.index(int(v)) for v in y[keep]])
    import os

    from safetensors.torch import save_file

    cwd = os.getcwd()
    os.chdir(trained.paths[0].parent)
    try:
        save_file({"images": x[keep].contiguous(), "labels": labels}, "subset.safetensors")
        ev = Evaluator.from_recipe(recipe, use_cache=False)
    finally:
        os.chdir(cwd)
    model = make_model()
    model.load_state_dict(trained.states[1])
    with torch.no_grad():
        expected = model(x[keep])[:, subset].argmax(1) == labels
    assert torch.equal(ev(trained.states[1])["heldout"].correct_mask, expected)


def test_holdout_fraction_and_limit_select_a_fixed_subset(trained):
    full = Evaluator.from_recipe(digits_recipe(), use_cache=False)
    part = Evaluator.from_recipe(digits_recipe(data={"heldout": {"kind": "digits", "split": "train",
                                                                 "holdout_fraction": 0.1, "holdout_seed": 3},
                                                     "test": {"clean": {"kind": "digits", "limit": 100}}}),
                                 use_cache=False)
    n_train = len(load_digits_split("train")[1])
    assert part.num_examples("heldout") == round(0.1 * n_train) and part.num_examples("clean") == 100
    first_100 = full(trained.states[2])["clean"].correct_mask[:100]
    assert torch.equal(part(trained.states[2])["clean"].correct_mask, first_100)
    again = Evaluator.from_recipe(part.recipe, use_cache=False)
    assert torch.equal(next(again.batches("heldout"))[0], next(part.batches("heldout"))[0])


def test_results_and_as_score():
    mask = torch.tensor([True, False, True, True])
    result = EvalResult({"heldout": DatasetResult("heldout", 3, 4, mask, 0.5, examples_seen=4),
                         "shift": DatasetResult("shift", 1, 4, mask, None, stopped_early=True, examples_seen=2)})
    assert as_score(result) == 0.75 and as_score(0.5) == 0.5 and as_score(torch.tensor(0.25)) == 0.25
    assert math.isnan(as_score(result["shift"])) and result.accuracy("shift") is None
    assert result.mean_accuracy(["shift"]) is None and result.mean_accuracy(["heldout"]) == 0.75
    data = json.loads(json.dumps(result.to_dict()))
    assert data["datasets"]["heldout"] == {"metric": "accuracy", "score": 0.75, "accuracy": 0.75, "correct": 3,
                                           "n": 4, "loss": 0.5, "seconds": 0.0, "stopped_early": False,
                                           "examples_seen": 4, "cached": False}
    with pytest.raises(ParameterError, match="unknown dataset 'held'.*Did you mean 'heldout'"):
        result["held"]
    with pytest.raises(ParameterError, match="expected an EvalResult or a number"):
        as_score("0.5")


def test_a_user_callable_is_a_valid_evaluator_for_soups(trained):
    """Soup algorithms take any ``state_dict -> float | EvalResult``; ``as_score`` turns either into a number."""
    ev = Evaluator.from_recipe(digits_recipe(), use_cache=False)

    def heldout_accuracy(state):  # what a user writes around their own evaluation loop
        return as_score(ev.evaluate(state, ["heldout"]))

    from soupkit.soups.scoring import Judge

    judge = Judge(heldout_accuracy)
    assert not judge.is_evaluator
    expected = reference(trained.states[2], "heldout")[0].float().mean().item()
    assert judge.score(trained.paths[2]).accuracy == pytest.approx(expected)
    assert Judge(ev).score(trained.paths[2]).correct == round(expected * ev.num_examples("heldout"))


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32_closely(trained):
    cpu = Evaluator.from_recipe(digits_recipe(), use_cache=False)
    gpu = Evaluator.from_recipe(digits_recipe(precision="auto"), device="cuda", use_cache=False)
    assert gpu.precision == "bf16" and gpu.device.type == "cuda"
    state = {k: v.cuda() for k, v in trained.states[2].items()}
    a, b = cpu(trained.states[2])["clean"], gpu(state)["clean"]
    assert (a.correct_mask == b.correct_mask).float().mean() > 0.97
    x, _ = next(gpu.batches("clean"))
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)


def test_memory_format_channels_last_for_convnets_scores_like_contiguous(trained, tmp_path):
    from soupkit.eval.evaluator import _memory_format

    nhwc = Evaluator.from_recipe(digits_recipe(), cache_dir=tmp_path)
    nchw = Evaluator.from_recipe(digits_recipe(memory_format="contiguous"), cache_dir=tmp_path)
    assert nhwc.memory_format == "channels_last" and nchw.memory_format == "contiguous"
    assert nhwc.model.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.model.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    a, b = nhwc(trained.paths[0]), nchw(trained.paths[0])
    assert not b["heldout"].cached  # one format's cached scores are not served to the other
    for name in nhwc.dataset_names:
        assert torch.equal(a[name].correct_mask, b[name].correct_mask)
        assert a[name].loss == pytest.approx(b[name].loss, rel=1e-5)
    assert _memory_format("auto", torch.device("cpu"), torch.nn.Linear(4, 2)) == "contiguous"
    vit_like = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    assert _memory_format("auto", torch.device("cpu"), vit_like) == "contiguous"  # one patch-embedding conv
    assert _memory_format("auto", torch.device("cuda"), torch.nn.Linear(4, 2)) == "channels_last"
    assert _memory_format("contiguous", torch.device("cpu"), make_model()) == "contiguous"


def test_an_evaluation_adds_its_line_to_a_running_progress_display(trained, tmp_path):
    """Inside a soup algorithm the step bar is live: an evaluation adds its per-batch line to that display (two
    live displays cannot share a terminal) and removes it when done."""
    from rich.console import Console
    from rich.progress import Progress

    ev = Evaluator.from_recipe(digits_recipe(), use_cache=False)
    live = Progress(console=Console(file=open(tmp_path / "screen.txt", "w"), force_terminal=True))  # noqa: SIM115
    steps = live.add_task("greedy soup", total=3)
    seen: list[list[str]] = []
    advance = live.advance

    def spy(task, advance_by=1):  # record the lines on screen while the evaluation runs
        seen.append([t.description for t in live.tasks])
        return advance(task, advance_by)

    live.advance = spy
    with live:
        ev.evaluate(trained.states[2], [ev.heldout_name], progress=live)
    assert any(any(d.startswith("eval candidate") for d in lines) for lines in seen)
    assert [t.id for t in live.tasks] == [steps]  # its line is gone again
