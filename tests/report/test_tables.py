"""Every table soupkit prints is complete at 60, 80 and 120 columns, in a pipe: nothing cut (every line fits,
every number and reason is there whole), folder ingredients shown by their folder's name, units said once
(accuracies in %, barriers in points), and nothing shown as a finding that holds by construction.

The commands run for real on the bundled ``digits`` recipe over small CNN checkpoints (random weights: the
scores are near chance, which does not matter to a table), in-process through the CLI's entry point with
``COLUMNS`` set, stdout captured (not a terminal: the pipe case); one doctor run is a real subprocess piped
through ``cat``'s place, at 80 columns.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soupkit.io import save_checkpoint

WIDTHS = (60, 80, 120)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, two fine-tune files with long names, one checkpoint folder, and one from another init."""
    from soupkit.demo_train import digits_cnn

    root = tmp_path_factory.mktemp("tables")
    torch.manual_seed(0)
    base = digits_cnn().state_dict()
    save_checkpoint(base, root / "zs.safetensors")
    files = {"base": root / "zs.safetensors"}
    for number, name in enumerate(("runs/finetuned_lr0.0003_wd0.01_seed00.safetensors",
                                   "runs/finetuned_lr0.0001_wd0.05_seed01.safetensors")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(10 + number)
        state = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
        files[f"ft{number}"] = save_checkpoint(state, root / name)
    (root / "runs" / "sweep_b").mkdir()
    torch.manual_seed(12)
    state = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
    save_checkpoint(state, root / "runs" / "sweep_b" / "model.safetensors")
    files["folder"] = root / "runs" / "sweep_b"
    torch.manual_seed(99)
    files["other"] = save_checkpoint(digits_cnn().state_dict(), root / "runs" / "other_init.safetensors")
    files["root"] = root
    files["cache"] = root / "cache"
    return files


def run(cli, monkeypatch, width: int, *args: object):
    monkeypatch.setenv("COLUMNS", str(width))
    result = cli(*args)
    assert result.code == 0, result.err
    return result


def assert_complete(text: str, width: int, *whole: str) -> None:
    """Every line fits ``width``; each of ``whole`` is there unbroken."""
    lines = text.splitlines()
    too_long = [line for line in lines if len(line.rstrip()) > width]
    assert not too_long, text
    for token in whole:
        assert token in text, (token, text)


def words_in_order(paragraph: str, text: str) -> bool:
    """``paragraph`` is in ``text`` whole, wrapped anywhere at spaces (so a cropped reason fails)."""
    flat = " ".join(text.split())
    return " ".join(paragraph.split()) in flat


def ingredients(files: dict[str, Path]) -> list[Path]:
    return [files["ft0"], files["ft1"], files["folder"]]


# ------------------------------------------------------------------ every table, rendered at 60/80/120


@pytest.fixture(scope="module")
def results(checkpoints) -> dict:
    """Each command's result computed once through the library (one evaluator, one score cache); the tests
    render them at every width, and run each command once through the CLI at 80 columns."""
    import soupkit
    from soupkit.eval import Evaluator
    from soupkit.eval.report import evaluate_checkpoints

    evaluator = Evaluator.from_recipe("digits", cache_dir=checkpoints["cache"])
    paths = ingredients(checkpoints)
    return {
        "doctor": soupkit.doctor([*paths, checkpoints["other"]], base=checkpoints["base"], evaluator=evaluator),
        "doctor2": soupkit.doctor(paths[:2]),
        "eval": evaluate_checkpoints(paths, evaluator),
        "greedy": soupkit.greedy_soup(paths, evaluator),
        "learned": soupkit.learned_soup(paths, evaluator, steps=3),
        "sweep": soupkit.wise_sweep(checkpoints["base"], paths[0], [0.0, 0.5, 1.0], evaluator),
    }


def render(width: int, draw) -> str:
    """What ``draw(console)`` prints on a console ``width`` columns wide that is not a terminal (a pipe)."""
    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), color_system=None, highlight=False)
    draw(console)
    return console.file.getvalue()


@pytest.mark.parametrize("width", WIDTHS)
def test_doctor_table_and_reasons_are_complete(results, width: int) -> None:
    report = results["doctor"]
    text = render(width, report.print)
    assert_complete(text, width, "held-out", "barrier", "sweep_b", "different_init")
    assert "model.safetensors" not in text  # the folder is named, not its weights file
    for name, why in report.reason.items():  # every reason whole, wrapped not cropped
        assert words_in_order(why, text), (name, why, text)
    assert words_in_order(report.overall_reason, text), text
    # units: held-out accuracies in %, barriers in points (a barrier of 0.1463 is 14.63 points)
    for name, score in report.scores.items():
        assert f"{100 * score:.2f}" in text, (name, text)
    for name, barrier in report.barrier.items():
        assert f"{100 * barrier:.2f}" in text, (name, barrier, text)
    table = text.split("ingredients:")[0]
    assert not re.search(r"\d%", table), table  # the unit is in the header, once


@pytest.mark.parametrize("width", WIDTHS)
def test_doctor_without_base_shows_no_angle_for_two_inputs(results, checkpoints, width: int) -> None:
    """θ₁ − mean = −(θ₂ − mean): 180° by construction is no finding, and ‖τ‖ equals the distance to the soup."""
    text = render(width, results["doctor2"].print)
    table = text.split("ingredients:")[0]
    assert "180" not in table and "°" not in table and "φ" not in table, text
    assert words_in_order("opposite by construction", text)
    assert text.count("to uniform") == 1 and "‖τ‖" not in text
    assert_complete(text, width)
    import soupkit

    three = soupkit.doctor(ingredients(checkpoints))
    assert "median angle" in render(width, three.print) and not three.angles_by_construction


@pytest.mark.parametrize("width", WIDTHS)
def test_eval_table_is_complete(results, width: int) -> None:
    from soupkit.report.layout import print_table

    report = results["eval"]
    text = render(width, lambda c: (print_table(report.table(), c), [c.print(n) for n in report.notes()]))
    assert_complete(text, width, "heldout", "clean", "occlusion", "mean shift", "sweep_b", "seed01")
    assert "model.safetensors" not in text
    for result in report.results:
        for name, value in result.datasets.items():
            assert f"{100 * value.accuracy:.2f}" in text, (name, text)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["greedy", "learned", "sweep"])
def test_soup_tables_are_complete(results, kind: str, width: int) -> None:
    result = results[kind]
    text = render(width, result.print_table)
    assert_complete(text, width, f"{100 * result.score:.2f}%")
    if kind != "sweep":
        assert "sweep_b" in text, text
        assert "model.safetensors" not in text, text
        if width >= 120:  # narrower, a long file name may be shortened from the middle: its end stays
            assert "finetuned_lr0.0001_wd0.05_seed01" in text, text
        assert "eed01" in text, text
    else:
        assert_complete(text, width, "heldout", "occlusion", "mean shift", "◀", "chosen by held-out accuracy")


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_and_methods_are_complete(checkpoints, cli, monkeypatch, width: int) -> None:
    result = run(cli, monkeypatch, width, "inspect", checkpoints["ft0"], "--keys")
    assert_complete(result.out, width, "float32", "features.0.weight")
    result = run(cli, monkeypatch, width, "inspect", checkpoints["ft0"], "--diff", checkpoints["ft1"])
    assert_complete(result.out, width, "changed")
    result = run(cli, monkeypatch, width, "methods")
    assert_complete(result.out, width, "dare_linear", "task_arithmetic", "model_stock")


# ------------------------------------------------------------------------- the commands, at 80 in a pipe


def test_doctor_in_a_real_pipe_at_80_columns(checkpoints) -> None:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "soupkit", "doctor", *map(str, ingredients(checkpoints)),
                           str(checkpoints["other"]), "--base", str(checkpoints["base"])],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert_complete(proc.stdout, 80, "different_init", "sweep_b", "gap")


def test_eval_greedy_and_wise_commands_fit_80_columns(checkpoints, cli, monkeypatch, tmp_path) -> None:
    paths = ingredients(checkpoints)
    cache = ("--cache-dir", checkpoints["cache"])
    result = run(cli, monkeypatch, 80, "eval", *paths, "--eval", "digits", *cache)
    assert_complete(result.out, 80, "heldout", "occlusion", "sweep_b")
    result = run(cli, monkeypatch, 80, "merge", "-m", "greedy", *paths, "--eval", "digits", *cache,
                 "-o", tmp_path / "greedy.safetensors")
    assert_complete(tables(result.err), 80, "sweep_b", "ingredient")
    assert "model.safetensors" not in result.err, result.err
    result = run(cli, monkeypatch, 80, "wise", checkpoints["base"], paths[0], "--alpha", "0:1:0.5",
                 "--eval", "digits", *cache, "-o", tmp_path / "wise.safetensors")
    assert_complete(tables(result.err), 80, "heldout", "occlusion", "◀", "chosen by held-out accuracy")


def tables(stderr: str) -> str:
    """``stderr`` without the closing "wrote PATH (size)" lines: a path is printed whole on one line (soft
    wrapped by the terminal, never broken by soupkit), so it stays copyable."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("wrote "))


# --------------------------------------------------------------------------- the label of a WiSE-FT sweep


def test_sweep_label_follows_the_data_set_that_decided() -> None:
    """An LLM sweep selected on multiple-choice accuracy while another set is a log-likelihood: the title says
    accuracy; selected on the log-likelihood set, it says log-likelihood."""
    from soupkit.report.tables import sweep_table
    from soupkit.soups.result import SoupResult, SweepPoint

    points = [SweepPoint(a, {"heldout": 0.5 + a / 10, "wikitext": -3.0 + a}, 0.5 + a / 10, chosen=a == 1.0)
              for a in (0.0, 0.5, 1.0)]
    result = SoupResult("wise_sweep", ["zs", "ft"], [1], [None, None], points, 0.6,
                        rule={"select": None}, extra={"alpha": 1.0})
    assert "chosen by held-out accuracy" in str(sweep_table(result).title)
    result.rule = {"select": "wikitext"}
    assert "chosen by wikitext log-likelihood" in str(sweep_table(result).title)


@pytest.mark.parametrize("width", WIDTHS)
def test_demo_table_is_complete(width: int) -> None:
    """The table ``soupkit demo`` prints, from the README's record: at 60 columns it continues in a second
    table rather than squeezing a number."""
    import json

    from soupkit.demo import results_table
    from soupkit.report.layout import print_table

    rows = json.loads((Path(__file__).resolve().parents[2] / "docs" / "demo.json").read_text())["models"]
    text = render(width, lambda c: print_table(results_table(rows), c))
    wise = next(m for m in rows if m.startswith("WiSE-FT")).replace(" (alpha=", " α=").removesuffix(")")
    assert_complete(text, width, "heldout", "occlusion", "finetuned_11", wise)
    for row in rows.values():
        for value in row.values():
            assert f"{100 * value:.1f}" in text
