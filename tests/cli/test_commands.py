"""The CLI: each command end to end, one-line errors with exit code 2, and a --help that never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soupkit.io import load_checkpoint, open_checkpoint
from tests.conftest import snapshot, tiny_state


def assert_user_error(result, *needles: str) -> None:
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_help_answers_without_importing_torch() -> None:
    code = ("import sys; from soupkit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "main_help = 'torch' in sys.modules\n"
            "try:\n    main(['merge', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if main_help or 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "NO-TORCH" in out and "soupkit merge" in out


def test_missing_inputs_are_refused_before_torch_loads(tmp_path: Path, make_ckpt) -> None:
    """A typo in a path answers at once: the one-line error comes before the ~3 s torch import."""
    real = make_ckpt("a", 0)
    commands = [["merge", str(real), str(tmp_path / "typo.safetensors"), "-o", str(tmp_path / "o.safetensors")],
                ["merge", str(real), str(real), "--method", "ties", "--base", str(tmp_path / "typo.safetensors"),
                 "-o", str(tmp_path / "o.safetensors")],
                ["wise", str(real), str(tmp_path / "typo.safetensors"), "-o", str(tmp_path / "o.safetensors")],
                ["eval", str(tmp_path / "typo.safetensors"), "--eval", "digits"],
                ["merge", str(real), str(real), "--method", "tie", "-o", str(tmp_path / "o.safetensors")]]
    for argv in commands:
        code = ("import sys; from soupkit.cli import main\n"
                f"try:\n    main({argv!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
                "print('EXIT', code, 'TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.stdout.split() == ["EXIT", "2", "NO-TORCH"], (argv, done.stdout, done.stderr)
        expected = ("unknown merge method 'tie'. Did you mean 'ties'?" if "tie" in argv else
                    f"{tmp_path / 'typo.safetensors'}: no such file")
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"soupkit {argv[0]}: error: {expected}"), done.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_uniform_and_linear(tmp_path: Path, make_ckpt, cli) -> None:
    a, b = make_ckpt("a", 0), make_ckpt("b", 1)
    result = cli("merge", a, b, "-o", tmp_path / "soup.safetensors")
    assert result.code == 0, result.err
    soup = load_checkpoint(tmp_path / "soup.safetensors")
    expected = (tiny_state(0)["head.weight"] + tiny_state(1)["head.weight"]) / 2
    assert torch.allclose(soup["head.weight"], expected, atol=1e-6)
    result = cli("merge", a, b, "--method", "linear", "--weights", "1,3", "-o", tmp_path / "lin.safetensors")
    assert result.code == 0, result.err
    lin = load_checkpoint(tmp_path / "lin.safetensors")
    expected = (tiny_state(0)["head.weight"] + 3 * tiny_state(1)["head.weight"]) / 4
    assert torch.allclose(lin["head.weight"], expected, atol=1e-6)


def test_merge_sharded_output_and_dtype(tmp_path: Path, make_ckpt, cli) -> None:
    a, b = make_ckpt("a", 0), make_ckpt("b", 1)
    result = cli("merge", a, b, "-o", tmp_path / "out" / "soup.safetensors", "--shard-size", "600B", "--dtype", "bf16")
    assert result.code == 0, result.err
    index = tmp_path / "out" / "soup.safetensors.index.json"
    assert index.exists() and len(list((tmp_path / "out").glob("soup-0000*-of-*.safetensors"))) > 1
    assert load_checkpoint(index)["head.weight"].dtype == torch.bfloat16


def test_wise_single_and_several_alphas(tmp_path: Path, make_ckpt, cli) -> None:
    zs, ft = make_ckpt("zs", 0), make_ckpt("ft", 1)
    assert cli("wise", zs, ft, "--alpha", "0", "-o", tmp_path / "w.safetensors").code == 0
    back = load_checkpoint(tmp_path / "w.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tiny_state(0).items())
    result = cli("wise", zs, ft, "--alpha", "0:1:0.5", "-o", tmp_path / "sweep.safetensors")
    assert result.code == 0, result.err
    names = sorted(p.name for p in tmp_path.glob("sweep_alpha*.safetensors"))
    assert names == ["sweep_alpha0.00.safetensors", "sweep_alpha0.50.safetensors", "sweep_alpha1.00.safetensors"]


def test_wise_extrapolation_warns_in_one_line(tmp_path: Path, make_ckpt, cli) -> None:
    zs, ft = make_ckpt("zs", 0), make_ckpt("ft", 1)
    result = cli("wise", zs, ft, "--alpha", "1.2", "-o", tmp_path / "w.safetensors", "-q")
    assert result.code == 0
    assert "alpha=1.2 is outside [0, 1]" in result.err and "Traceback" not in result.err


def test_inspect_shows_provenance_and_diff(tmp_path: Path, make_ckpt, cli) -> None:
    a, b = make_ckpt("a", 0), make_ckpt("b", 1)
    cli("merge", a, b, "-o", tmp_path / "soup.safetensors")
    result = cli("inspect", tmp_path / "soup.safetensors", "--json")
    info = json.loads(result.out)
    assert info["tensors"] == len(tiny_state(0)) and info["metadata"]["soupkit.method"] == "uniform"
    assert [i["name"] for i in info["metadata"]["soupkit.ingredients"]] == ["a.safetensors", "b.safetensors"]
    result = cli("inspect", a, "--diff", a, "--json")
    report = json.loads(result.out)
    assert report["summary"]["l2"] == 0.0 and report["summary"]["cosine"] == pytest.approx(1.0)
    result = cli("inspect", a, "--diff", b)
    assert result.code == 0 and "head.weight" in result.out and "cosine" in result.out


def test_convert_pt_to_safetensors(tmp_path: Path, cli) -> None:
    state = tiny_state(0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "m.pt")
    result = cli("convert", tmp_path / "m.pt", tmp_path / "m.safetensors")
    assert result.code == 0, result.err
    back = load_checkpoint(tmp_path / "m.safetensors")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert open_checkpoint(tmp_path / "m.safetensors").metadata["soupkit.method"] == "convert"


def test_methods_lists_registry(cli) -> None:
    result = cli("methods")
    assert result.code == 0 and "uniform" in result.out and "wise" in result.out and "greedy" in result.out


@pytest.mark.parametrize("args, needles", [
    (["merge", "{a}", "{b}", "-o", "{out}", "--method", "unifrom"], ["unknown merge method 'unifrom'",
                                                                     "Did you mean 'uniform'"]),
    (["merge", "{a}", "{b}", "-o", "{out}", "--weights", "a,b"], ["weights[0] must be a number, got a"]),
    (["merge", "{a}", "{b}", "-o", "{out}", "--weights", "1,2,3"], ["has 3 values for 2 input models"]),
    (["merge", "{a}", "{b}", "-o", "{out}", "--dtype", "fp8"], ["--dtype: unknown dtype 'fp8'"]),
    (["merge", "{a}", "{b}", "-o", "{out}", "--shard-size", "banana"], ["--shard-size: expected a size"]),
    (["merge", "{a}", "{b}", "-o", "{a}", "--force"], ["would overwrite the input"]),
    (["merge", "{a}", "{b}", "-o", "{b}"], ["would overwrite the input"]),
    (["merge", "{a}", "{a}", "-o", "{out}"], ["given twice"]),
    (["merge", "{a}", "{missing}", "-o", "{out}"], ["missing.safetensors: no such file"]),
    (["merge", "{a}", "{b}"], ["Missing option '--output'"]),
    (["merge", "{a}", "{b}", "-o", "{out}", "--bogus"], ["No such option: --bogus"]),
    (["wise", "{a}", "{b}", "-o", "{out}", "--alpha", "x"], ["--alpha: expected numbers like"]),
    (["merge", "{a}", "{b}", "-o", "{out}", "--method", "wise", "--density", "0.5"],
     ["has no parameter --density",
      "--density is a parameter of breadcrumbs, breadcrumbs_ties, dare_ties, della, della_linear, ties"]),
    (["merge", "{a}", "-o", "{out}", "--method", "wise"], ["needs exactly 2 input models, got 1"]),
    (["inspect", "{missing}"], ["missing.safetensors: no such file"]),
])
def test_user_errors_are_one_line_exit_2_and_leave_nothing(tmp_path: Path, make_ckpt, cli, args, needles) -> None:
    paths = {"a": make_ckpt("a", 0), "b": make_ckpt("b", 1), "out": tmp_path / "out.safetensors",
             "missing": tmp_path / "missing.safetensors"}
    before = snapshot(tmp_path)
    result = cli(*[a.format(**paths) for a in args])
    assert_user_error(result, *needles)
    assert snapshot(tmp_path) == before


def test_real_subprocess_error_has_no_traceback(tmp_path: Path, make_ckpt) -> None:
    a = make_ckpt("a", 0)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    soupkit = Path(sys.executable).with_name("soupkit")
    proc = subprocess.run([str(soupkit), "merge", str(a), str(bad), "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "bad.safetensors: not a valid safetensors file" in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()
