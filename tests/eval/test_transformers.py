"""The evaluator on transformers models (``kind: transformers``): counts equal a plain, unbatched transformers
loop; the soups, WiSE-FT, ``soupkit eval``, learned soups and Fisher work on text recipes; one-line errors."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import yaml

from tests.eval.text_models import TextKit, classifier_recipe, lm_recipe, make_causal_lm, make_classifier


@pytest.fixture(scope="session")
def bert(tmp_path_factory: pytest.TempPathFactory) -> TextKit:
    return make_classifier(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> TextKit:
    return make_causal_lm(tmp_path_factory.mktemp("gpt2"))


def _hf(kit: TextKit, checkpoint: Any, causal: bool) -> tuple[Any, Any]:
    """The plain transformers model of ``kit`` with ``checkpoint`` loaded, and its tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_pretrained(kit.folder, local_files_only=True).eval()
    model.load_state_dict(load_file(str(checkpoint)), strict=False)  # lm_head.weight is tied
    return model, AutoTokenizer.from_pretrained(kit.folder, local_files_only=True)


def _rows(path: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def reference_classifier(kit: TextKit, checkpoint: Any, path: Any) -> list[bool]:
    """Batch 1, dataset order, no padding: is each example's argmax its label?"""
    model, tok = _hf(kit, checkpoint, causal=False)
    out = []
    with torch.no_grad():
        for row in _rows(path):
            label = model.config.label2id.get(row["label"], row["label"])
            out.append(int(model(**tok(row["text"], return_tensors="pt")).logits.argmax(-1)) == label)
    return out


def _loglik(model: Any, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return sum(float(logprobs[p, t]) for p, t in zip(positions, continuation))


def reference_choices(kit: TextKit, checkpoint: Any, path: Any) -> list[bool]:
    """lm-eval-harness ``acc``: the choice with the highest summed log-likelihood given the prompt."""
    model, tok = _hf(kit, checkpoint, causal=True)
    out = []
    with torch.no_grad():
        for row in _rows(path):
            context = tok(row["question"].rstrip(), add_special_tokens=False).input_ids
            scores = []
            for choice in row["choices"]:
                whole = tok(row["question"] + choice, add_special_tokens=False).input_ids
                scores.append(_loglik(model, context, whole[len(context):]))
            out.append(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return out


def reference_text(kit: TextKit, checkpoint: Any, path: Any) -> tuple[list[float], float]:
    """Each text's mean per-token log-likelihood after the EOS prefix, and the token-weighted mean."""
    model, tok = _hf(kit, checkpoint, causal=True)
    means, total, count = [], 0.0, 0
    with torch.no_grad():
        for row in _rows(path):
            ids = tok(row["text"], add_special_tokens=False).input_ids
            value = _loglik(model, [tok.eos_token_id], ids)
            means.append(value / len(ids))
            total, count = total + value, count + len(ids)
    return means, total / count


def test_classifier_counts_equal_a_plain_transformers_loop(bert, tmp_path):
    from soupkit.eval import Evaluator

    ev = Evaluator.from_recipe(classifier_recipe(bert), cache_dir=tmp_path)
    for checkpoint in bert.finetunes:
        result = ev(checkpoint)
        for name, key in (("heldout", "heldout"), ("clean", "test")):
            expected = reference_classifier(bert, checkpoint, bert.files[key])
            assert result[name].correct == sum(expected)
            assert result[name].correct_mask.tolist() == expected  # in dataset order, despite bucketing
    counts = {ev(c)["heldout"].correct for c in bert.finetunes}
    assert len(counts) > 1, "the fine-tunes should differ"
    assert ev(bert.finetunes[0])["heldout"].cached


def test_causal_lm_choices_and_log_likelihood_equal_a_plain_loop(gpt2, tmp_path):
    from soupkit.eval import Evaluator

    ev = Evaluator.from_recipe(lm_recipe(gpt2), cache_dir=tmp_path)
    overall = {}
    for checkpoint in gpt2.finetunes[1:]:
        result = ev(checkpoint)
        for name, key in (("heldout", "heldout"), ("mc", "test")):
            expected = reference_choices(gpt2, checkpoint, gpt2.files[key])
            assert result[name].correct_mask.tolist() == expected
        text = result["text"]
        means, overall[checkpoint] = reference_text(gpt2, checkpoint, gpt2.files["text"])
        assert text.metric == "log_likelihood" and text.accuracy is None and text.correct_mask is None
        assert text.score == pytest.approx(overall[checkpoint], abs=1e-4)
        assert text.perplexity == pytest.approx(math.exp(-overall[checkpoint]), rel=1e-4)
        assert torch.allclose(text.values, torch.tensor(means), atol=1e-4)
    cached = ev(gpt2.finetunes[1])["text"]
    assert cached.cached and cached.score == pytest.approx(overall[gpt2.finetunes[1]], abs=1e-4)
    assert len(cached.values) == 24


def test_checkpoint_forms_and_strict_loading(gpt2, tmp_path):
    """An HF folder, a state dict with the tied lm_head.weight and one without all load; a wrong one fails."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from soupkit.errors import CheckpointError
    from soupkit.eval import Evaluator

    ev = Evaluator.from_recipe(lm_recipe(gpt2), use_cache=False)
    state = load_file(str(gpt2.finetunes[2]))
    model = AutoModelForCausalLM.from_pretrained(gpt2.folder, local_files_only=True)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(tmp_path / "hf")
    expected = ev(gpt2.finetunes[2], ["heldout"])["heldout"].correct_mask
    assert torch.equal(ev(tmp_path / "hf", ["heldout"])["heldout"].correct_mask, expected)
    tied = {**state, "lm_head.weight": state["transformer.wte.weight"]}
    assert torch.equal(ev(tied, ["heldout"])["heldout"].correct_mask, expected)
    broken = {k: v for k, v in state.items() if k != "transformer.h.0.attn.c_attn.weight"}
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"^<state dict>: does not fit the recipe's model \(transformers.*"
                                              r"missing 1 key\(s\) \('transformer.h.0.attn.c_attn.weight'\); "
                                              r"unexpected 1 key\(s\) \('extra.weight'\)"):
        ev(broken, ["heldout"])


def test_bucketing_and_early_stop(bert):
    """Batches are cut to their longest example (less padding than dataset order); need_correct is exact."""
    from soupkit.eval import Evaluator

    ev = Evaluator.from_recipe(classifier_recipe(bert), use_cache=False)
    data = ev._prepared("heldout")
    bucketed = sum(x.shape[-1] * len(x) for x, _ in ev.batches("heldout"))
    unbucketed = sum(int(data.lengths[i:i + 8].max()) * len(data.lengths[i:i + 8]) for i in range(0, data.n, 8))
    assert bucketed < unbucketed
    full = ev(bert.finetunes[2], ["heldout"])["heldout"]
    order = torch.randperm(full.n, generator=torch.Generator().manual_seed(0))
    hopeless = ev.evaluate(bert.finetunes[2], ["heldout"], need_correct=full.correct + 8, order=order)["heldout"]
    assert hopeless.stopped_early and hopeless.examples_seen < full.n
    exact = ev.evaluate(bert.finetunes[2], ["heldout"], need_correct=full.correct, order=order)["heldout"]
    assert not exact.stopped_early and torch.equal(exact.correct_mask, full.correct_mask)


def test_soups_wise_eval_and_fisher_through_the_cli(cli, bert, tmp_path):
    recipe = tmp_path / "text.yaml"
    recipe.write_text(yaml.safe_dump(classifier_recipe(bert)))
    soup = tmp_path / "soup.safetensors"
    out = cli("merge", "--method", "greedy", *bert.finetunes, "--eval", recipe, "-o", soup, "-q")
    assert out.code == 0, out.err
    wise = cli("wise", bert.base, bert.finetunes[2], "--alpha", "0:1:0.25", "--eval", recipe,
               "-o", tmp_path / "wise.safetensors", "-q")
    assert wise.code == 0, wise.err
    scores = cli("eval", soup, bert.finetunes[2], "--eval", recipe, "--json", tmp_path / "s.json")
    assert scores.code == 0 and "heldout" in scores.out, scores.err
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["checkpoints"][0]["datasets"]["heldout"]["metric"] == "accuracy"
    fisher = cli("fisher", bert.finetunes[0], "--eval", recipe, "-o", tmp_path / "f.safetensors",
                 "--max-examples", "8")
    assert fisher.code == 0, fisher.err
    from safetensors.torch import load_file

    values = load_file(str(tmp_path / "f.safetensors"))
    assert "classifier.weight" in values and float(values["classifier.weight"].sum()) > 0


def test_lm_greedy_learned_and_fisher(gpt2, tmp_path):
    from soupkit import greedy_soup, learned_soup
    from soupkit.errors import ParameterError
    from soupkit.eval import Evaluator
    from soupkit.merging.fisher_info import compute_fisher

    ev = Evaluator.from_recipe(lm_recipe(gpt2), cache_dir=tmp_path)
    greedy = greedy_soup(gpt2.finetunes, ev)
    assert greedy.score is not None and 0 <= greedy.score <= 1
    learned = learned_soup(gpt2.finetunes, ev, steps=3, lr=0.1)
    assert len(learned.extra["weights"]) == 3 and math.isfinite(learned.extra["heldout_loss"])
    fisher = compute_fisher(gpt2.finetunes[0], ev, max_examples=4)
    assert "transformer.wte.weight" in fisher and "lm_head.weight" not in fisher
    text_only = lm_recipe(gpt2)
    text_only["data"] = {"heldout": text_only["data"]["test"]["text"]}
    text_ev = Evaluator.from_recipe(text_only, cache_dir=tmp_path)
    by_likelihood = greedy_soup(gpt2.finetunes, text_ev)  # selects on mean log-likelihood
    assert by_likelihood.score < 0 and math.isfinite(by_likelihood.score)
    assert by_likelihood.score >= max(text_ev(p)["heldout"].score for p in gpt2.finetunes)
    learned_text = learned_soup(gpt2.finetunes, text_ev, steps=2, lr=0.05)  # trains on the token NLL
    assert learned_text.score < 0 and learned_text.extra["heldout_loss"] == pytest.approx(-learned_text.score)
    with pytest.raises(ParameterError, match="^Fisher information needs class or choice scores; dataset "
                                             "'heldout' .* is plain text scored by log-likelihood"):
        compute_fisher(gpt2.finetunes[0], text_ev)


def test_eval_report_shows_log_likelihood_and_perplexity(cli, gpt2, tmp_path):
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(yaml.safe_dump(lm_recipe(gpt2)))
    out = cli("eval", *gpt2.finetunes[:2], "--eval", recipe, "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv")
    assert out.code == 0, out.err
    assert "log-likelihood per token (perplexity)" in out.out
    text = json.loads((tmp_path / "s.json").read_text())["checkpoints"][0]["datasets"]["text"]
    assert text["metric"] == "log_likelihood" and text["accuracy"] is None and text["tokens"] > 0
    assert text["perplexity"] == pytest.approx(math.exp(-text["score"]))
    assert f"{text['score']:.4f} ({text['perplexity']:.2f})" in out.out
    header, first = (tmp_path / "s.csv").read_text().splitlines()[:2]
    assert header == "checkpoint,heldout,mc,text,mean shift" and first.split(",")[3] == f"{text['score']:.6f}"


@pytest.mark.parametrize(("change", "expected"), [
    (lambda r: r["data"]["heldout"].pop("label_field"),
     r"data.heldout.label_field: missing; a sequence-classification model scores text_field and label_field"),
    (lambda r: r["data"]["heldout"].update(prompt_field="q"),
     r"data.heldout.prompt_field: not used with a sequence-classification model"),
    (lambda r: r["model"].update(task="translation"), r"model.task: .*sequence-classification"),
    (lambda r: r["data"]["heldout"].update(kind="csv", delimiter=";;"),
     r"data.heldout.delimiter: expected one character, got ';;'"),
    (lambda r: r["data"]["heldout"].update(max_length="long"), r"data.heldout.max_length: Input should be a valid"),
    (lambda r: r["data"]["heldout"].update(kind="hf_disk"),
     r"data.heldout.kind: hf_disk needs the 'datasets' package"),
    (lambda r: r["data"]["heldout"].update(kind="digits"),
     r"data.heldout.path: unknown key 'path'"),
    (lambda r: r["data"].update(heldout={"kind": "digits", "split": "heldout"}),
     r"data.heldout.kind: digits gives images but the recipe's model takes text"),
])
def test_recipe_errors_are_one_line(bert, tmp_path, change, expected):
    import importlib.util

    from soupkit.errors import RecipeError
    from soupkit.eval import Evaluator

    if "hf_disk" in expected and importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed here")
    recipe = classifier_recipe(bert)
    change(recipe)
    with pytest.raises(RecipeError, match=expected) as error:
        Evaluator.from_recipe(recipe, use_cache=False).evaluate(bert.finetunes[0], ["heldout"])
    assert "\n" not in str(error.value)


def test_data_errors_name_file_and_line(bert, tmp_path):
    from soupkit.errors import RecipeError
    from soupkit.eval import Evaluator

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film", "label": "pos"}\n\n{"text": "bad", "label": "meh"}\n')
    recipe = classifier_recipe(bert)
    recipe["data"]["heldout"]["path"] = str(bad)
    ev = Evaluator.from_recipe(recipe, use_cache=False)
    with pytest.raises(RecipeError, match=rf"^{bad}:3: label 'meh' in 'label' is neither a class id nor a label "
                                          r"of the model config's label2id \(neg, pos\)$"):
        ev(bert.finetunes[0], ["heldout"])
    bad.write_text('{"text": "good film", "label": 1}\n{"text": "bad", "label": 1\n')
    with pytest.raises(RecipeError, match=rf"^{bad}:2: not valid JSON"):
        Evaluator.from_recipe(recipe, use_cache=False)(bert.finetunes[0], ["heldout"])
    table = tmp_path / "t.csv"
    table.write_text('sentence,label\n"good film, nice",pos\nbad plot,0\n')
    recipe["data"]["heldout"] = {"kind": "csv", "path": str(table), "text_field": "sentence", "label_field": "label"}
    ev = Evaluator.from_recipe(recipe, use_cache=False)
    assert ev(bert.finetunes[0], ["heldout"])["heldout"].n == 2
    recipe["data"]["heldout"]["text_field"] = "text"
    with pytest.raises(RecipeError, match=rf"^{table}:1: no field 'text' \(text_field\)"):
        Evaluator.from_recipe(recipe, use_cache=False)(bert.finetunes[0], ["heldout"])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_equal_one_on_text(gpt2, tmp_path):
    """torchrun: each process tokenises and scores its shard; masks and per-example values come back whole."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from soupkit.eval import Evaluator

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(lm_recipe(gpt2)))
    out, repo = tmp_path / "dist.json", Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).with_name("dist_worker.py")), str(recipe), str(out), str(tmp_path / "cache"),
               str(gpt2.finetunes[1])]
    done = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2 and got["cached_again"]
    assert got["group_still_held"] == 0  # pinned past destroy, its threads abort the process at exit
    single = Evaluator.from_recipe(recipe, use_cache=False)(gpt2.finetunes[1])
    for name, row in got["rows"][0].items():
        expected = single[name]
        assert row["correct"] == expected.correct and row["n"] == expected.n
        assert row["loss"] == pytest.approx(expected.loss, rel=1e-5)
        if expected.correct_mask is not None:
            assert row["mask"] == expected.correct_mask.int().tolist()
        else:
            assert row["values"] == pytest.approx(expected.values.tolist(), abs=1e-5)


def test_example_recipes_run_next_to_their_files(bert, gpt2, tmp_path):
    """recipes/text-classification.yaml and llm-multiple-choice.yaml, copied next to files made as they say."""
    import shutil
    from pathlib import Path

    from soupkit.eval import Evaluator

    repo = Path(__file__).resolve().parents[2]
    for kit, name, files in ((bert, "text-classification", {"heldout.jsonl": "heldout", "test.jsonl": "test"}),
                             (gpt2, "llm-multiple-choice", {"heldout.jsonl": "heldout", "test.jsonl": "test",
                                                            "wiki.jsonl": "text"})):
        folder = tmp_path / name
        shutil.copytree(kit.folder, folder / "base")
        for target, key in files.items():
            shutil.copy(kit.files[key], folder / target)
        shutil.copy(repo / "recipes" / f"{name}.yaml", folder)
        result = Evaluator.from_recipe(folder / f"{name}.yaml", device="cpu", use_cache=False)(kit.finetunes[0])
        assert all(r.score is not None for r in result.datasets.values())


def test_tokens_are_cached_for_the_next_process(bert, tmp_path, monkeypatch):
    from soupkit.eval import Evaluator, text

    first = Evaluator.from_recipe(classifier_recipe(bert), cache_dir=tmp_path)
    expected = first(bert.finetunes[1])["clean"].correct_mask
    assert len(list((tmp_path / "tokens").glob("*-0of1.safetensors"))) == 2

    def refuse(*_args: object) -> None:
        raise AssertionError("tokenised again")

    monkeypatch.setattr(text, "_tokenise", refuse)
    again = Evaluator.from_recipe(classifier_recipe(bert), cache_dir=tmp_path)
    assert torch.equal(again(bert.finetunes[1], use_cache=False)["clean"].correct_mask, expected)
    recipe = classifier_recipe(bert)
    recipe["data"]["test"]["clean"]["max_length"] = 6  # a different dataset definition: a different key
    with pytest.raises(AssertionError, match="tokenised again"):
        Evaluator.from_recipe(recipe, cache_dir=tmp_path)(bert.finetunes[1], ["clean"])


def test_bf16_autocast_path(gpt2):
    """precision bf16 (what ``auto`` picks on CUDA) runs the same code under autocast: choice scores and token
    log-likelihoods are computed in float32 from the bf16 logits, so the results stay close to fp32."""
    from soupkit.eval import Evaluator

    fp32 = Evaluator.from_recipe(lm_recipe(gpt2), use_cache=False)(gpt2.finetunes[2])
    bf16 = Evaluator.from_recipe(lm_recipe(gpt2, precision="bf16"), use_cache=False)(gpt2.finetunes[2])
    assert abs(bf16["heldout"].correct - fp32["heldout"].correct) <= 2
    assert bf16["text"].score == pytest.approx(fp32["text"].score, abs=0.05)


def test_decoder_classifier_pools_the_last_real_token(gpt2, tmp_path):
    """A GPT-2 sequence classifier pools the last non-pad token (found by config.pad_token_id): padded,
    length-bucketed batches give the unpadded batch-1 predictions."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from soupkit.eval import Evaluator
    from tests.eval.text_models import NUMBERS, write_jsonl

    rng = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(NUMBERS[int(s):int(s) + int(n)]), "label": int(s) % 2}
            for s, n in zip(torch.randint(0, 6, (24,), generator=rng), torch.randint(1, 7, (24,), generator=rng))]
    recipe = classifier_recipe(gpt2)
    recipe["model"]["path"] = str(gpt2.folder)
    recipe["data"] = {"heldout": {"kind": "jsonl", "path": str(write_jsonl(tmp_path / "d.jsonl", rows)),
                                  "text_field": "text", "label_field": "label"}}
    ev = Evaluator.from_recipe(recipe, use_cache=False)
    torch.manual_seed(3)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ev.model.state_dict().items()}
    got = ev(state)["heldout"].correct_mask.tolist()
    model = AutoModelForSequenceClassification.from_pretrained(gpt2.folder, local_files_only=True).eval()
    model.load_state_dict(state, strict=False)
    tok = AutoTokenizer.from_pretrained(gpt2.folder, local_files_only=True)
    with torch.no_grad():
        expected = [int(model(**tok(r["text"], return_tensors="pt")).logits.argmax(-1)) == r["label"] for r in rows]
    assert got == expected and 0 < sum(got) < len(rows)


def test_cli_errors_are_one_line_with_no_output(cli, bert, gpt2, tmp_path):
    from tests.conftest import snapshot

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film", "label": "pos"}\n{"text": "bad", "label": 7}\n')
    recipe = classifier_recipe(bert)
    recipe["data"]["heldout"]["path"] = str(bad)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(classifier_recipe(bert)))
    before = snapshot(gpt2.finetunes[0].parent)
    cases = [(("eval", bert.finetunes[0], "--eval", tmp_path / "r.yaml"),
              f"{bad}:2: label 7 in 'label' is outside the model's 2 classes"),
             (("merge", "--method", "greedy", *gpt2.finetunes[:2], "--eval", tmp_path / "good.yaml",
               "-o", tmp_path / "soup.safetensors"), "does not fit the recipe's model (transformers "
                                                     f"{bert.folder}): missing")]
    for args, message in cases:
        out = cli(*args)
        assert out.code == 2 and out.err.count("\n") == 1 and message in out.err, out.err
    assert not (tmp_path / "soup.safetensors").exists() and snapshot(gpt2.finetunes[0].parent) == before
