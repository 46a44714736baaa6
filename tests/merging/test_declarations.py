"""One declaration per method and option: the CLI flags, help, docs tables and validation all come from the method
signatures and ``OutputOptions``; plugins from other packages get all of it too."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import soupkit
from soupkit.io import load_checkpoint
from soupkit.options import OutputOptions, flag
from soupkit.report.methods import GENERATED, docs_table, generated_section

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "style"), list(GENERATED.items()))
def test_generated_method_tables_are_current(name: str, style: str) -> None:
    text = (ROOT / name).read_text()
    assert generated_section(text) == docs_table(style), (
        f"{name}: the methods table is stale; run `python -m soupkit.report.methods --write`")


def merge_help() -> str:
    from soupkit.cli import app

    return CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "200"}).output


def test_every_method_parameter_and_output_option_is_a_merge_flag() -> None:
    text = merge_help()
    for method in soupkit.list_methods():
        for param in soupkit.get_method(method).parameters:
            assert flag(param) in text, (method, param)
    for option in OutputOptions.model_fields:
        assert flag(option) in text, option


def test_normalize_is_a_real_option(make_ckpt, tmp_path: Path, cli) -> None:
    a, b = make_ckpt("a", 0), make_ckpt("b", 1)
    out = tmp_path / "sum.safetensors"
    result = cli("merge", a, b, "-m", "linear", "--weights", "1,1", "--normalize", "false", "-o", out, "-q")
    assert result.code == 0, result.err
    expected = soupkit.merge([a, b], "linear", weights=[1, 1], normalize=False)
    written = load_checkpoint(out)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert torch.allclose(written["head.weight"], sa["head.weight"] + sb["head.weight"])
    bad = cli("merge", a, b, "-m", "linear", "--normalize", "maybe", "-o", tmp_path / "x.safetensors")
    assert bad.code == 2 and "--normalize must be true or false, got maybe" in bad.err


@pytest.mark.parametrize(("argv", "message"), [
    (["--weights", "nan,1"], "--weights[0] must be a finite number, got nan"),
    (["--weights", "inf,1"], "--weights[0] must be a finite number, got inf"),
    (["-m", "wise", "--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["-m", "ties", "--base", "{a}", "--scaling", "nan"], "--scaling must be a finite number"),
    (["-m", "dare_linear", "--base", "{a}", "--seed", "-1"], "--seed must be in [0, 9223372036854775808), got -1"),
    (["--shard-size", "inf"], "--shard-size: expected a finite size"),
    (["--shard-size", "1e400GB"], "--shard-size: expected a finite size"),
    (["--device", "meta"], "--device: unknown device 'meta'"),
    (["--device", "gpu"], "--device: unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"),
    (["--dtype", "16"], "--dtype: unknown dtype '16'"),
])
def test_non_finite_and_absurd_options_are_one_line_errors(make_ckpt, tmp_path: Path, cli, argv, message) -> None:
    a, b = make_ckpt("a", 0), make_ckpt("b", 1)
    args = [str(a) if x == "{a}" else x for x in argv]
    result = cli("merge", a, b, *args, "-o", tmp_path / "o.safetensors")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert message in result.err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weights": [float("nan"), 1.0]}, "weights[0] must be a finite number"),
    ({"dtype": torch.int8}, "dtype: unknown dtype 'int8'"),
    ({"shard_size": "5GB", "method": None}, "method: expected a method name"),
    ({"device": "meta"}, "device: unknown device 'meta'"),
    ({"shard_size": float("inf")}, "shard_size: expected a size like"),
    ({"include": 3}, "include: expected a glob"),
    ({"weights": [1e308, 1e308]}, "weights are too large: their sum overflows"),
    ({"weights": [True, 1.0]}, "weights[0] must be a number, not true/false"),
    ({"output": 5}, "output: expected a file or folder path, got int"),
    ({"shard_size": True}, "shard_size"),
])
def test_library_arguments_of_the_wrong_type(make_ckpt, kwargs, message) -> None:
    a, b = make_ckpt("a", 0), make_ckpt("b", 1)
    method = kwargs.pop("method", "linear")
    output = kwargs.pop("output", None)
    with pytest.raises(soupkit.SoupkitError) as caught:
        soupkit.merge([a, b], method, output, **kwargs)
    assert message in str(caught.value)


def test_library_accepts_torch_dtypes_and_size_strings(make_ckpt, tmp_path: Path) -> None:
    a, b = make_ckpt("a", 0), make_ckpt("b", 1)
    merged = soupkit.merge([a, b], dtype=torch.float16)
    assert merged["head.weight"].dtype == torch.float16
    written = soupkit.merge([a, b], output=tmp_path / "s.safetensors", dtype=torch.float16, shard_size="5GB")
    assert written == tmp_path / "s.safetensors"  # everything fits in one shard: one file, no index
    with pytest.raises(soupkit.SoupkitError, match="shard_size does not apply to an in-memory state dict"):
        soupkit.merge([a, b], shard_size="5GB")  # nothing would be sharded: refused, not ignored


def test_config_values_are_checked_like_flags(tmp_path: Path, make_ckpt) -> None:
    from soupkit.merging.config import load_merge_config

    make_ckpt("a", 0), make_ckpt("b", 1), make_ckpt("base", 2)
    (tmp_path / "m.yaml").write_text("method: ties\nbase: base.safetensors\nmodels: [a.safetensors, b.safetensors]\n"
                                     "parameters: {scaling: true}\n")
    with pytest.raises(soupkit.SoupkitError, match="scaling must be a number, not true/false"):
        load_merge_config(tmp_path / "m.yaml")
    (tmp_path / "w.yaml").write_text("method: linear\nmodels: [{path: a.safetensors, weight: .nan}, b.safetensors]\n")
    with pytest.raises(soupkit.SoupkitError, match=r"weights\[0\] must be a finite number"):
        load_merge_config(tmp_path / "w.yaml")
    import os

    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(soupkit.SoupkitError, match="not a regular file"):
        load_merge_config(tmp_path / "fifo.yaml")


def test_a_method_output_that_overflows_is_refused(tmp_path: Path) -> None:
    states = [{"w": torch.full((4,), 3e38)}, {"w": torch.full((4,), 3e38)}]
    with pytest.raises(soupkit.SoupkitError, match="not finite"):
        soupkit.merge(states, "linear", weights=[1, 1], normalize=False)


# --------------------------------------------------------------------------------------------- plugins

PLUGIN = '''
"""A merge method from another package: registered through the soupkit.methods entry-point group."""
from collections.abc import Sequence
from typing import Annotated

from soupkit import Param, merge_method


@merge_method("scaled_mean", pretty_name="Scaled mean (a plugin)", reference="https://example.org/scaled")
def scaled_mean(tensors: Sequence, *, gain: Annotated[float, Param("Multiply the mean by this.", gt=0)] = 1.0):
    """gain * mean of the models (a test plugin)."""
    total = None
    for tensor in tensors:
        total = tensor.clone() if total is None else total.add_(tensor)
    return total.mul_(gain / len(tensors))
'''


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A folder that makes an installed plugin: its module and a *.dist-info with entry_points.txt, plus a broken
    plugin whose import fails."""
    site = tmp_path / "site"
    (site / "soupkit_scaled").mkdir(parents=True)
    (site / "soupkit_scaled" / "__init__.py").write_text(PLUGIN)
    (site / "soupkit_broken.py").write_text("raise RuntimeError('this plugin is broken on purpose')\n")
    for name, module in [("soupkit_scaled", "soupkit_scaled"), ("soupkit_broken", "soupkit_broken")]:
        info = site / f"{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[soupkit.methods]\n{name} = {module}\n")
    return site


def run_python(code: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_a_plugin_method_works_everywhere_and_a_broken_one_only_warns(plugin_path: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    for i in range(2):
        save_file({"w": torch.full((3,), float(i + 1))}, str(tmp_path / f"m{i}.safetensors"))
    (tmp_path / "merge.yaml").write_text("method: scaled_mean\nmodels: [m0.safetensors, m1.safetensors]\n"
                                         "parameters: {gain: 4}\n")
    code = """
    import sys, torch, soupkit
    from soupkit.cli import main
    from soupkit.io import load_checkpoint
    def cli(*args):
        try:
            main(list(args))
        except SystemExit as e:
            assert not e.code, e.code
    cli("methods")
    cli("merge", "m0.safetensors", "m1.safetensors", "-m", "scaled_mean", "--gain", "2", "-o", "cli.safetensors", "-q")
    cli("merge", "--config", "merge.yaml", "-o", "config.safetensors", "-q")
    library = soupkit.merge(["m0.safetensors", "m1.safetensors"], "scaled_mean", gain=3.0)
    print("RESULT", load_checkpoint("cli.safetensors")["w"].tolist(),
          load_checkpoint("config.safetensors")["w"].tolist(), library["w"].tolist())
    try:
        soupkit.merge(["m0.safetensors", "m1.safetensors"], "scaled_mean", gain=-1.0)
    except soupkit.SoupkitError as error:
        print("ERROR", error)
    """
    done = run_python(code, plugin_path, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "scaled_mean" in done.stdout and "Scaled mean (a plugin)" in done.stdout  # soupkit methods
    assert "RESULT [3.0, 3.0, 3.0] [6.0, 6.0, 6.0] [4.5, 4.5, 4.5]" in done.stdout
    assert "ERROR scaled_mean: gain must be > 0, got -1.0" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "soupkit_broken" in line]
    assert len(warnings) == 1 and "failed to load and is skipped" in warnings[0], done.stderr
    assert "Traceback" not in done.stderr


def test_merge_help_names_plugin_parameters(plugin_path: Path, tmp_path: Path) -> None:
    done = run_python("""
    from soupkit.cli import main
    try:
        main(["merge", "--help"])
    except SystemExit:
        pass
    """, plugin_path, tmp_path)
    assert "--gain" in done.stdout and "scaled_mean" in done.stdout, done.stdout + done.stderr


def test_duplicate_method_names_are_refused() -> None:
    from soupkit.merging.registry import merge_method

    with pytest.raises(ValueError, match="already registered"):
        merge_method("uniform", pretty_name="again")(lambda tensors: tensors[0])
