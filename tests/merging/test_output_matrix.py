"""The output matrix: every command that writes a checkpoint x every writer x every output option, generated
from the declarations (``soupkit.merging.writers.WRITERS`` and each command's ``Command``), checked on the
written files. An option a writer and the command both honour must be honoured (the written result equals the
command's in-memory result under the same options, plus the option's own check); any other must be refused in
one line before anything is written. A new ``OutputOptions`` field no writer declares fails
``test_every_option_is_honoured_by_some_writer``; one without a check here fails ``test_every_option_has_a_check``.

Commands run through the library (the CLI is a thin shell over it; tests/soups/test_output_forms.py runs the
issue's greedy command lines). Commands whose own code path is the merge's (uniform merges, WiSE-FT, convert,
adapter soups) take the full writers x options product; the others (TIES, configs, the soups, zeroshot) take the
writer axis with no option and the option axis with the plain file writer, which is where they differ.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import soupkit
from soupkit.errors import ParameterError
from soupkit.eval.models.clip import zeroshot_checkpoint
from soupkit.inspection import convert
from soupkit.io import load_checkpoint, open_checkpoint
from soupkit.merging.config import merge_from_config
from soupkit.merging.writers import COPY, MERGE, WRITERS, ZEROSHOT, choose_writer, soup_command
from soupkit.options import Command, OutputOptions
from tests.conftest import snapshot

#: one value per option, as a library call gives it (each differs from the default)
VALUES: dict[str, Any] = {"dtype": "fp16", "precise": True, "device": "auto", "shard_size": 600,
                          "include": ["2.*"], "exclude": ["2.*"], "allow_missing": True, "allow_nonfinite": True,
                          "ema": True, "force": True, "strip_prefix": "model.", "add_prefix": "net.", "rank": 4}
#: what each writer needs to be the one chosen: an output name (under out/) and options
WRITER_SETUP: dict[str, tuple[str | None, dict[str, Any]]] = {
    "safetensors": ("r.safetensors", {}), "shards": ("r.safetensors", {"shard_size": 600}),
    "hf_folder": ("r/", {}), "torch": ("r.pt", {}), "lightning": ("r.ckpt", {}), "memory": (None, {}),
    "adapter": ("adapter/", {}), "adapter_svd": ("adapter/", {"rank": 4}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one intra-op thread is fastest, and several oversubscribe a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp_state(seed: int) -> dict[str, torch.Tensor]:
    """The digits MLP's tensors (tests/soups/conftest.py), random with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {"0.weight": torch.randn(32, 64, generator=g) * 0.1, "0.bias": torch.randn(32, generator=g) * 0.1,
            "2.weight": torch.randn(10, 32, generator=g) * 0.1, "2.bias": torch.randn(10, generator=g) * 0.1}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three models in each variant an option acts on: plain, with EMA weights, with a ``model.`` prefix, one
    lacking a tensor; two Fisher files."""
    folder = tmp_path_factory.mktemp("matrix-inputs")
    made: dict[str, list[Path]] = {"plain": [], "ema": [], "prefixed": [], "missing": []}
    for seed in range(3):
        state = mlp_state(seed)
        made["plain"].append(folder / f"m{seed}.safetensors")
        save_file(state, str(made["plain"][-1]))
        made["ema"].append(folder / f"ema{seed}.pt")
        torch.save({"state_dict": state, "state_dict_ema": mlp_state(seed + 10)}, made["ema"][-1])
        made["prefixed"].append(folder / f"pre{seed}.pt")
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, made["prefixed"][-1])
        made["missing"].append(folder / f"miss{seed}.safetensors")
        save_file({k: v for k, v in state.items() if not (seed == 1 and k == "2.bias")}, str(made["missing"][-1]))
    made["fisher"] = []
    for seed in range(2):
        made["fisher"].append(folder / f"fisher{seed}.safetensors")
        save_file({k: v.abs() + 0.1 for k, v in mlp_state(seed + 20).items()}, str(made["fisher"][-1]))
    return made


@pytest.fixture(scope="module")
def evaluator():
    from soupkit.merging.bn import checkpoint_keys
    from tests.soups.conftest import DigitsEvaluator, load_digits_data

    class Evaluator(DigitsEvaluator):
        """Loads a state dict whose names carry a prefix (as the real Evaluator does), for --recalibrate-bn."""

        def load_state(self, state):
            names = checkpoint_keys(self.model.state_dict(), state)
            super().load_state({name: state[key] for name, key in names.items()})

    data = load_digits_data()
    return lambda: Evaluator(data)


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.io.test_lora import ADAPTERS, LLAMA, make_adapter

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("matrix-llama") / "base"
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(base)
    return [make_adapter(base, base.parent / name, seed, **ADAPTERS[name])
            for seed, name in enumerate(("r4", "r2-rslora"), start=1)]


@dataclass(frozen=True)
class Case:
    """A command as the matrix runs it: ``run(inputs, output, evaluator, **options)`` -> what it returned."""

    declared: Command
    run: Callable[..., Any]
    adapters: bool = False  # its inputs are LoRA adapters merged without a base
    in_memory: bool = True  # it can return its result instead of writing it
    product: bool = True  # the full writers x options product (False: the two axes)
    copies_first: bool = False  # unmerged tensors (include/exclude) come from its first input
    two_models: bool = False  # two inputs, and no allow_missing to test (the sweeps refuse it)


def _soup(result: Any) -> Any:
    return result.path if result.path is not None else result.state_dict


COMMANDS: dict[str, Case] = {
    "merge-uniform": Case(MERGE, lambda i, out, ev, **o: soupkit.merge(i[:2], "uniform", out, **o),
                          copies_first=True),
    "merge-ties": Case(MERGE, lambda i, out, ev, **o: soupkit.merge(i[:2], "ties", out, base=i[2], density=0.5, **o),
                       copies_first=True, product=False),
    "wise": Case(MERGE, lambda i, out, ev, **o: soupkit.wise_ft(i[0], i[1], 0.3, out, **o), copies_first=True,
                 product=False),  # a key one model lacks is copied from the other (allow_missing)
    "config": Case(MERGE, lambda i, out, ev, **o: merge_from_config(
        {"method": "linear", "models": [str(p) for p in i[:2]], "parameters": {"weights": [1, 3]}}, out, **o),
        copies_first=True, product=False),
    "merge-bn": Case(MERGE, lambda i, out, ev, **o: soupkit.merge(i[:2], "uniform", out, recalibrate_bn=ev(), **o),
                     copies_first=True, product=False),  # the written result goes through the plan's transform
    "greedy": Case(soup_command("greedy soup"), lambda i, out, ev, **o: _soup(
        soupkit.greedy_soup(i[:3], ev(), accept="ge", output=out, **o)), product=False),
    "learned": Case(soup_command("learned soup"), lambda i, out, ev, **o: _soup(
        soupkit.learned_soup(i[:2], ev(), steps=2, output=out, **o)), product=False),
    "wise-sweep": Case(soup_command("WiSE-FT sweep"), lambda i, out, ev, **o: _soup(
        soupkit.wise_sweep(i[0], i[1], "0.25,0.5", ev(), output=out, **o)), product=False, two_models=True),
    "fisher-sweep": Case(soup_command("WiSE-FT sweep"), lambda i, out, ev, fisher, **o: _soup(
        soupkit.wise_sweep(i[0], i[1], "0.5", ev(), output=out, fisher=fisher, **o)), product=False,
        two_models=True),
    "convert": Case(COPY, lambda i, out, ev, **o: convert(i[0], out, **o), in_memory=False, product=False),
    "zeroshot": Case(ZEROSHOT, lambda i, out, ev, clip, **o: zeroshot_checkpoint(
        "soupkit-tiny-clip", clip[1], "simple", output=out, config=clip[0], **o), in_memory=False, product=False),
    "merge-adapters": Case(MERGE, lambda i, out, ev, **o: soupkit.merge(i[:2], "linear", out, weights=[0.7, 0.3],
                                                                        **o), adapters=True, in_memory=False),
}


def rows() -> list[tuple[str, str, str | None]]:
    """(command, writer, option) from the declarations: every writer a command's inputs can reach, with no
    option and with each option (the option axis alone for the expensive commands)."""
    out = []
    for command, case in COMMANDS.items():
        for writer in WRITERS.values():
            if writer.adapter != case.adapters or (writer.name == "memory" and not case.in_memory):
                continue
            for option in [None, *OutputOptions.model_fields]:
                if not case.product and option is not None and writer.name != ("adapter" if case.adapters
                                                                                  else "safetensors"):
                    continue
                out.append((command, writer.name, option))
    return out


def test_every_option_is_honoured_by_some_writer() -> None:
    """An OutputOptions field nobody declares would be refused everywhere: declare it on the writers that honour
    it (soupkit.merging.writers.WRITERS)."""
    unclaimed = set(OutputOptions.model_fields) - set().union(*(w.honours for w in WRITERS.values()))
    assert not unclaimed, f"no writer honours {sorted(unclaimed)}"
    assert all(set(w.honours) <= set(OutputOptions.model_fields) for w in WRITERS.values())


def test_every_option_has_a_check() -> None:
    assert set(VALUES) == set(OutputOptions.model_fields)


def test_every_writer_is_chosen_by_its_setup() -> None:
    for name, (output, options) in WRITER_SETUP.items():
        writer = choose_writer(output, [], OutputOptions(**options), adapter_soup=WRITERS[name].adapter)
        assert writer.name == name
    assert set(WRITER_SETUP) == set(WRITERS)


def _inputs(files: dict[str, list[Path]], adapter_files: Any, case: Case, option: str | None) -> list[Path]:
    if case.adapters:
        return adapter_files
    variants = {"ema": "ema", "strip_prefix": "prefixed", "allow_missing": "plain" if case.two_models else "missing"}
    variant = variants.get(option or "", "plain")
    return files[variant]


def _expected(case: Case, writer: str, option: str | None) -> bool:
    if option is None:
        return True
    declared = case.declared.honours
    return option in WRITERS[writer].honours and (declared is None or option in declared)


@pytest.mark.parametrize(("command", "writer", "option"), rows())
def test_matrix(command: str, writer: str, option: str | None, files, evaluator, request, tmp_path: Path) -> None:
    case = COMMANDS[command]
    name, required = WRITER_SETUP[writer]
    options = dict(required)
    if option is not None:
        options[option] = VALUES[option]
    if choose_writer(name, [], OutputOptions(**options), adapter_soup=case.adapters).name != writer:
        pytest.skip(f"{option} makes this another writer's row")
    adapters = request.getfixturevalue("adapter_files") if case.adapters else None
    inputs = _inputs(files, adapters, case, option)
    extra: dict[str, Any] = {}
    if command == "fisher-sweep":
        extra["fisher"] = files["fisher"]
    if command == "zeroshot":
        extra["clip"] = _clip(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = None if name is None else f"{out_dir}/{name}"  # a trailing / names a folder
    before = snapshot(inputs[0].parent)

    def run(**given: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return case.run(inputs, output, evaluator, **extra, **given)

    if not _expected(case, writer, option):
        with pytest.raises(ParameterError) as refused:
            run(**options)
        message = str(refused.value)
        assert "does not apply" in message and "\n" not in message, message
        assert not any(out_dir.iterdir()), "a refused option left output"
        return
    if option == "force":  # an existing output: refused without force, replaced with it
        del options["force"]
        run(**options)
        with pytest.raises(soupkit.SoupkitError, match="use --force"):
            run(**options)
        options["force"] = True
    result = run(**options)
    assert snapshot(inputs[0].parent) == before, "an input changed"
    written = result if isinstance(result, dict) else load_checkpoint(result)
    if case.in_memory and writer != "memory" and not case.adapters:
        in_memory = {k: v for k, v in options.items() if k in WRITERS["memory"].honours}
        reference = run_in_memory(case, inputs, evaluator, extra, in_memory)
        assert set(written) == set(reference)
        for key in reference:
            assert written[key].dtype == reference[key].dtype and torch.equal(written[key], reference[key]), key
    check_option(case, writer, option, result, written, inputs)


def run_in_memory(case: Case, inputs: list[Path], evaluator: Any, extra: dict, options: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return case.run(inputs, None, evaluator, **extra, **options)


def check_option(case: Case, writer: str, option: str | None, result: Any, written: dict, inputs: list[Path]
                 ) -> None:
    """What the written files must show for ``option`` (and for the writer itself)."""
    if writer == "shards" or option == "shard_size":
        index = Path(result) if writer == "shards" else Path(result) / "model.safetensors.index.json"
        assert index.name.endswith(".index.json") and len(set(json.loads(index.read_text())["weight_map"]
                                                              .values())) > 1
    if writer == "hf_folder":
        assert Path(result).is_dir()
    if writer in ("adapter", "adapter_svd"):
        config = json.loads((Path(result) / "adapter_config.json").read_text())
        assert config["r"] == (4 if writer == "adapter_svd" else config["r"])
        return
    floats = [k for k, v in written.items() if v.is_floating_point()]
    if option == "dtype":
        assert floats and all(written[k].dtype == torch.float16 for k in floats)
    elif option in ("include", "exclude") and case.copies_first:
        first = load_checkpoint(inputs[0])
        copied = [k for k in floats if k.startswith("2.") == (option == "exclude")]
        assert copied and all(torch.equal(written[k], first[k]) for k in copied)
    elif option == "strip_prefix":
        assert written and not any(k.startswith("model.") for k in written)
    elif option == "add_prefix":
        assert written and all(k.startswith("net.") for k in written)
    elif option == "allow_missing":
        assert "2.bias" in written
    elif option == "ema" and case.declared is COPY:
        assert torch.equal(written["0.weight"], mlp_state(10)["0.weight"])  # the EMA weights, not the raw ones
    if not isinstance(result, dict):
        with open_checkpoint(result) as reader:
            assert "soupkit.version" in reader.metadata or writer in ("torch", "lightning")


def _clip(tmp_path: Path) -> tuple[Path, Path]:
    from tests.eval.helpers import TINY_CLIP

    config = tmp_path / "soupkit-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    return config, classes


def test_the_output_table_in_the_docs_is_current() -> None:
    """docs/output.md's tables are generated from the declarations (every prose list of options points there)."""
    from soupkit.report.methods import OUTPUT_BEGIN, OUTPUT_DOC, OUTPUT_END, generated_section, output_table

    text = (Path(__file__).resolve().parents[2] / OUTPUT_DOC).read_text()
    assert generated_section(text, OUTPUT_BEGIN, OUTPUT_END) == output_table(), (
        f"{OUTPUT_DOC} is stale; run `python -m soupkit.report.methods --write`")
