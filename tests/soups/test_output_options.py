"""Every soup algorithm honours every output option (or refuses it in one line): the matrix algorithm x option,
checked on the written files. The written soup is also the merge engine's result for the same inputs and options,
bit for bit, and what was scored is what was written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupkit.errors import OutputError, ParameterError
from soupkit.io import load_checkpoint
from soupkit.merging import merge, wise_ft
from soupkit.merging.writers import WRITERS
from soupkit.soups import greedy_soup, learned_soup, wise_sweep

ALGORITHMS = ("greedy", "learned", "sweep")


def run(algorithm: str, paths: list[Path], ev, out: Path | None, **options):
    """Run one algorithm on small settings; returns (result, the reference soup from the engine, first member)."""
    if algorithm == "greedy":
        result = greedy_soup(paths[:4], ev, accept="ge", output=out, **options)
        selected = [paths[i] for i in result.ingredients]
        return result, lambda **o: merge(selected, "linear", **o), selected[0]
    if algorithm == "learned":
        result = learned_soup(paths[:3], ev, steps=2, output=out, **options)
        return result, lambda **o: merge(paths[:3], "linear", weights=result.extra["weights"], **o), paths[0]
    result = wise_sweep(paths[0], paths[1], "0.25,0.5", ev, output=out, **options)
    return result, lambda **o: wise_ft(paths[0], paths[1], result.alpha, **o), paths[0]


def check_against_reference(result, reference, **options) -> dict:
    written = load_checkpoint(result.path)
    # the reference is computed in memory: with the options an in-memory result honours (not force, shard_size)
    expected = reference(**{k: v for k, v in options.items() if k in WRITERS["memory"].honours})
    assert set(written) == set(expected)
    for key in expected:
        assert written[key].dtype == expected[key].dtype and torch.equal(written[key], expected[key]), key
    return written


@pytest.fixture
def setup(digits_setup, tmp_path):
    return digits_setup.paths, digits_setup.make_evaluator, tmp_path / "soup.safetensors"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dtype_fp16_written_and_scored(algorithm, setup):
    paths, make_evaluator, out = setup
    ev = make_evaluator()
    seen = []
    evaluate = ev.evaluate
    ev.evaluate = lambda state, *a, **k: (seen.append(state) if isinstance(state, dict) else None,
                                          evaluate(state, *a, **k))[1]
    result, reference, _ = run(algorithm, paths, ev, out, dtype="fp16")
    written = check_against_reference(result, reference, dtype="fp16")
    assert all(t.dtype == torch.float16 for t in written.values())
    # candidates are cast to the output dtype before they are scored: the score is the written file's
    assert seen and all(t.dtype == torch.float16 for state in seen for t in state.values())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_shard_size_writes_shards_and_an_index(algorithm, setup):
    paths, make_evaluator, out = setup
    result, reference, _ = run(algorithm, paths, make_evaluator(), out, shard_size=4096)
    assert result.path.name.endswith(".index.json") and result.path.exists()
    shards = sorted(out.parent.glob("soup-*.safetensors"))
    assert len(shards) >= 2
    check_against_reference(result, reference, shard_size=4096)


@pytest.mark.parametrize("option", ["include", "exclude"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_include_exclude_keep_the_first_members_tensors(algorithm, option, setup):
    paths, make_evaluator, out = setup
    patterns = ["0.*"] if option == "include" else ["2.*"]  # either way: the head (2.*) is not merged
    result, reference, first = run(algorithm, paths, make_evaluator(), out, **{option: patterns})
    written = check_against_reference(result, reference, **{option: patterns})
    first_state = load_checkpoint(first)
    for key in ("2.weight", "2.bias"):
        assert torch.equal(written[key], first_state[key]), key
    if len(result.ingredients) > 1 and result.method != "wise_sweep":
        assert not torch.equal(written["0.weight"], first_state["0.weight"])  # the rest was merged


@pytest.fixture
def ema_paths(digits_setup, tmp_path):
    """torch checkpoints whose EMA weights are the digits ingredients and whose raw weights are useless noise."""
    paths = []
    for i, state in enumerate(digits_setup.ingredients[:4]):
        noise = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for k, v in state.items()}
        paths.append(tmp_path / f"ema{i}.pt")
        torch.save({"state_dict": noise, "state_dict_ema": state}, paths[-1])
    return paths


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ema_weights_are_used(algorithm, ema_paths, digits_setup, tmp_path):
    ev = digits_setup.make_evaluator()
    result, reference, _ = run(algorithm, ema_paths, ev, tmp_path / "soup.safetensors", ema=True)
    written = check_against_reference(result, reference, ema=True)
    assert result.score > 0.5  # scored on the EMA weights: the raw ones are noise (~10%)
    raw = reference(ema=False)
    assert not torch.equal(written["0.weight"], raw["0.weight"])
    if algorithm == "greedy":
        assert all(s is not None and s > 0.5 for s in result.scores)  # individual scores too


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_existing_output_refused_without_force_replaced_with_it(algorithm, setup):
    paths, make_evaluator, out = setup
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="output exists; use --force"):
        run(algorithm, paths, make_evaluator(), out)
    assert out.read_bytes() == b"old"
    result, reference, _ = run(algorithm, paths, make_evaluator(), out, force=True)
    check_against_reference(result, reference)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_precise_accumulates_in_float64(algorithm, setup):
    paths, make_evaluator, out = setup
    ev = make_evaluator()
    seen = []
    evaluate = ev.evaluate
    ev.evaluate = lambda state, *a, **k: (seen.append(dict(state)) if isinstance(state, dict) else None,
                                          evaluate(state, *a, **k))[1]
    result, reference, _ = run(algorithm, paths, ev, out, precise=True)
    written = check_against_reference(result, reference, precise=True)
    assert all(t.dtype == torch.float32 for t in written.values())
    plain = reference(precise=False)
    assert any(not torch.equal(written[k], plain[k]) for k in written)  # float64 accumulation shows in the bits
    assert all(t.dtype == torch.float32 for state in seen for t in state.values())  # scored as written


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_device_reaches_the_final_merge(algorithm, setup):
    paths, make_evaluator, out = setup
    result, reference, _ = run(algorithm, paths, make_evaluator(), out, device="cpu")
    check_against_reference(result, reference, device="cpu")
    with pytest.raises(ParameterError, match="device: unknown device 'tpu'"):
        run(algorithm, paths, make_evaluator(), out, device="tpu", force=True)


@pytest.mark.parametrize("algorithm", ["greedy", "sweep"])
def test_allow_nonfinite(algorithm, tmp_path):
    """A NaN the evaluator does not look at: refused at the final merge without allow_nonfinite (no output),
    written with it."""
    from soupkit.errors import NonFiniteError

    states = [{"w": torch.tensor([0.1 * i, 0.0]), "v": torch.tensor([1.0, 2.0 + i])} for i in range(3)]
    states[1]["v"][0] = float("nan")
    score = lambda state: 1.0 - abs(float(state["w"].sum()) - 0.05)  # noqa: E731  (#0 + #1 is best)

    def soup(out, **options):
        if algorithm == "greedy":
            return greedy_soup(states, score, accept="ge", output=out, **options)
        return wise_sweep(states[0], states[1], "0.5", score, output=out, **options)

    with pytest.raises(NonFiniteError, match=r"<state dict #1>: tensor 'v' contains NaN or Inf \(pass "
                                             r"--allow-nonfinite"):
        soup(tmp_path / "soup.safetensors")
    assert not (tmp_path / "soup.safetensors").exists()
    result = soup(tmp_path / "soup.safetensors", allow_nonfinite=True)
    assert torch.isnan(load_checkpoint(result.path)["v"][0])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_refused_options_in_one_line(algorithm, setup):
    paths, make_evaluator, out = setup
    with pytest.raises(ParameterError, match=r"allow_missing does not apply to the .*: it scores every "
                                             r"candidate as a whole model"):
        run(algorithm, paths, make_evaluator(), out, allow_missing=True)
    with pytest.raises(ParameterError, match=r"unknown output option 'shard'\. Did you mean 'shard_size'\? "
                                             r"Available: add_prefix, allow_missing, allow_nonfinite, device, dtype"):
        run(algorithm, paths, make_evaluator(), out, shard=1000)
    with pytest.raises(ParameterError, match="dtype: unknown dtype 'fp12'"):
        run(algorithm, paths, make_evaluator(), out, dtype="fp12")
    with pytest.raises(ParameterError, match="pattern 'nothing.*' matches no tensor name"):
        run(algorithm, paths, make_evaluator(), out, include=["nothing.*"])
    assert not out.exists()


def test_by_layer_learned_soup_is_the_linear_method_per_tensor(digits_setup, tmp_path):
    """A by-layer soup is the engine's linear merge with per-tensor weights: each tensor equals the linear merge
    with that tensor's weights, under the same output options."""
    paths = digits_setup.paths[:3]
    options = {"dtype": "fp16", "exclude": ["2.bias"], "shard_size": 4096, "precise": True}
    out = tmp_path / "soup.safetensors"
    out.write_bytes(b"old")
    ev = digits_setup.make_evaluator()
    result = learned_soup(paths, ev, steps=3, by_layer=True, output=out, force=True, **options)
    assert result.path.name.endswith(".index.json") and len(list(tmp_path.glob("soup-*.safetensors"))) >= 2
    written = load_checkpoint(result.path)
    assert [entry.key for entry in result.history] == ["0.weight", "0.bias", "2.weight"]
    for entry in result.history:
        in_memory = {k: v for k, v in options.items() if k in WRITERS["memory"].honours}
        expected = merge(paths, "linear", weights=entry.weights, **in_memory)[entry.key]
        assert written[entry.key].dtype == torch.float16 and torch.equal(written[entry.key], expected), entry.key
    assert torch.equal(written["2.bias"], load_checkpoint(paths[0])["2.bias"].half())
    assert ev.evaluate(written, ["heldout"], use_cache=False)["heldout"].loss == result.extra["heldout_loss"]


def test_ingredient_names_are_file_names(tmp_path):
    from soupkit.soups.common import ingredient_names

    paths = [tmp_path / "run1" / "model.safetensors", tmp_path / "run2" / "model.safetensors",
             tmp_path / "other.safetensors", "rel/x.pt"]
    assert ingredient_names([*paths, {"w": torch.zeros(1)}]) == ["run1/model.safetensors", "run2/model.safetensors",
                                                                 "other.safetensors", "x.pt", "<state dict #4>"]
