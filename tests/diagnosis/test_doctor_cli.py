"""``soupkit doctor`` end to end: the table, --json/--plot, exit codes and one-line errors with no output left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import snapshot


def _one_line_error(result, *needles: str) -> None:
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soupkit doctor: error: "), result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_table_json_and_plot(cli, ingredients, tmp_path: Path) -> None:
    before = snapshot(ingredients.folder)
    out = tmp_path / "doctor.json"
    paths = [*ingredients.same, ingredients.other]
    result = cli("doctor", *paths, "--base", ingredients.base, "--json", out, "--plot", tmp_path / "angles.png")
    assert result.code == 0, result.err
    assert "soupkit doctor: use greedy" in result.out and "different_init" in result.out
    assert "median angle per module (soupable inputs): features " in result.out
    data = json.loads(out.read_text())
    assert data["names"] == [str(p) for p in paths]
    assert data["verdict"][str(ingredients.other)] == "different_init"
    assert (tmp_path / "angles.png").read_bytes()[:4] == b"\x89PNG"
    assert snapshot(ingredients.folder) == before  # inputs untouched


def test_mismatched_shapes_are_a_verdict(cli, ingredients, tmp_path: Path) -> None:
    import soupkit
    from soupkit.demo_train import digits_cnn

    odd = tmp_path / "wide.safetensors"
    soupkit.save_checkpoint(digits_cnn(num_classes=3).state_dict(), odd)
    result = cli("doctor", *ingredients.same[:2], odd, "--json", tmp_path / "d.json", "-q")
    assert result.code == 0 and result.out == "", result.err
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["verdict"][str(odd)] == "incompatible" and data["overall"] == "use greedy"
    assert "shape mismatch at 'head.3.weight'" in data["reason"][str(odd)]


@pytest.mark.parametrize("case", ["missing", "one", "twice", "json_folder", "json_dir", "json_is_input",
                                  "base_shape", "not_a_checkpoint", "recipe"])
def test_bad_inputs_exit_2_with_one_line(cli, ingredients, tmp_path: Path, case: str) -> None:
    from soupkit.demo_train import digits_cnn
    from soupkit.io import save_checkpoint

    a, b = ingredients.same[:2]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    odd = tmp_path / "odd.safetensors"
    save_checkpoint(digits_cnn(num_classes=4).state_dict(), odd)
    cases = {
        "missing": ([a, tmp_path / "nope.safetensors"], [f"{tmp_path / 'nope.safetensors'}: no such file"]),
        "one": ([a], ["give at least two, got 1"]),
        "twice": ([a, a], [f"{a}: given twice (inputs #1 and #2)"]),
        "json_folder": ([a, b, "--json", tmp_path / "no" / "d.json"], ["--json: folder", "does not exist"]),
        "json_dir": ([a, b, "--plot", tmp_path], ["--plot:", "is a directory"]),
        "json_is_input": ([a, b, "--json", b], ["--json:", "is one of the inputs"]),
        "base_shape": ([a, b, "--base", odd], ["shape mismatch at 'head.3.weight'", str(odd)]),
        "not_a_checkpoint": ([a, junk], [str(junk)]),
        "recipe": ([a, b, "--eval", "digitz"], ["digitz", "digits"]),
    }
    args, needles = cases[case]
    before = snapshot(ingredients.folder)
    written = {p.name for p in tmp_path.iterdir()}
    result = cli("doctor", *args)
    _one_line_error(result, *needles)
    assert snapshot(ingredients.folder) == before
    assert {p.name for p in tmp_path.iterdir()} == written  # no partial output


def test_help_and_missing_file_answer_without_torch(tmp_path: Path) -> None:
    code = ("import sys; from soupkit.cli import main\n"
            f"try:\n    main(['doctor', 'a.safetensors', {str(tmp_path / 'b.safetensors')!r}])\n"
            "except SystemExit as exit:\n    print('EXIT', exit.code)\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.split() == ["EXIT", "2", "NO-TORCH"], done.stderr
    assert done.stderr.strip() == "soupkit doctor: error: a.safetensors: no such file"
