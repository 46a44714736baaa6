"""What soupkit shows a person: tables readable at 80 and 120 columns (numbers and headers never cut, file names
never broken mid-word, tensor keys never confused), short reprs, ``--version``, progress only on a terminal,
provenance without machine paths, atomic small-file writes, and plots whose labels overlap nothing."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from soupkit.report.layout import Wrapped, common_parts, print_table, shorten_middle

WIDTHS = (80, 120)
DATASETS = ["heldout", "clean", "noise", "rotation", "blur", "inversion", "occlusion"]


def render(table, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), color_system=None, highlight=False)
    print_table(table, console)
    return console.file.getvalue().splitlines()


def assert_fits(lines: list[str], width: int, *whole: str) -> None:
    text = "\n".join(lines)
    assert all(len(line) <= width for line in lines), text
    for token in whole:  # each number and header appears unbroken somewhere
        assert token in text, (token, text)


# --------------------------------------------------------------------------------------------- helpers


def test_shorten_middle_keeps_the_file_name_and_both_ends() -> None:
    assert shorten_middle("runs/sweep_a/finetuned_07.safetensors", 100) == "runs/sweep_a/finetuned_07.safetensors"
    assert shorten_middle("runs/sweep_a/finetuned_07.safetensors", 28) == "…/finetuned_07.safetensors"
    assert shorten_middle("runs/sweep_a/finetuned_07.safetensors", 35) == "…/sweep_a/finetuned_07.safetensors"
    short = shorten_middle("finetuned_with_a_long_name_07", 12)
    assert len(short) == 12 and short.startswith("finet") and short.endswith("_07") and "…" in short


def test_common_parts_strip_the_shared_folder_and_extension_and_keep_names_distinct() -> None:
    labels, folder, ext = common_parts(["/data/runs/a/ft_1.safetensors", "/data/runs/b/ft_1.safetensors"])
    assert (labels, folder, ext) == (["a/ft_1", "b/ft_1"], "/data/runs", ".safetensors")
    assert common_parts(["x.pt", "y.safetensors"]) == (["x.pt", "y.safetensors"], None, None)


def test_wrapped_keys_break_after_dots_and_lose_nothing() -> None:
    key = "encoder.layers.10.self_attention.query_projection.weight"
    lines = Wrapped(key).lines(20)
    assert "".join(lines) == key and all(len(line) <= 20 for line in lines)
    assert lines[0] == "encoder.layers.10."


# ----------------------------------------------------------------------------------------------- tables


def _eval_report():
    from soupkit.eval.report import EvalReport
    from soupkit.eval.result import DatasetResult, EvalResult

    report = EvalReport("recipes/digits.yaml", DATASETS, DATASETS[2:])
    names = ["experiments/sweep/soup.safetensors",
             *(f"experiments/sweep/ingredients/finetuned_lr0.0003_wd0.01_{i:02d}.safetensors" for i in range(3))]
    for i, name in enumerate(names):
        result = EvalResult(checkpoint=name)
        for dataset in DATASETS:
            result.datasets[dataset] = DatasetResult(dataset, 900 + i, 1000, torch.ones(1000, dtype=torch.bool))
        report.results.append(result)
    return report


@pytest.mark.parametrize("width", WIDTHS)
def test_eval_table_fits_without_cutting_numbers_headers_or_names(width: int) -> None:
    report = _eval_report()
    lines = render(report.table(), width)
    assert_fits(lines, width, *DATASETS, "mean shift" if width >= 120 else "mean", "90.00", "90.30")
    rows = [line for line in lines if "90.0" in line or "90.1" in line or "90.2" in line or "90.3" in line]
    assert len(rows) == 4
    for row, suffix in zip(rows, ["soup", "_00", "_01", "_02"]):
        label = row.strip("│ ").split()[0]
        assert label.endswith(suffix), row  # the end of the name (what tells files apart) is kept
    assert "checkpoints: experiments/sweep/*.safetensors" in report.notes()


def _greedy_result():
    from soupkit.soups.result import GreedyStep, SoupResult

    names = [f"/home/someone/runs/finetuned_hparams_lr0.001_seed{i}.safetensors" for i in range(4)]
    history = [GreedyStep(0, 2, names[2], 0.9812, 0.9812, True, note="best held-out accuracy: starts the soup"),
               GreedyStep(1, 0, names[0], 0.9801, 0.9857, True),
               GreedyStep(2, 3, names[3], 0.9700, None, False, True, 64, "stopped early: cannot reach 458 of 472"),
               GreedyStep(3, 1, names[1], 0.9650, 0.9833, False)]
    return SoupResult("greedy", names, [2, 0], [0.9801, 0.9650, 0.9812, 0.97], history, 0.9857,
                      rule={"accept": "gt"}, state_dict={"w": torch.zeros(1000, 1000)})


@pytest.mark.parametrize("width", WIDTHS)
def test_greedy_table_fits(width: int) -> None:
    lines = render(_greedy_result().table(), width)
    assert_fits(lines, width, "98.12%", "98.57%", "98.33%", "stopped early", "individual acc", "candidate acc")
    text = "\n".join(lines)
    assert "ingredients: /home/someone/runs/*.safetensors" in text
    for i in range(4):
        assert f"seed{i}" in text  # labels keep the part that differs


@pytest.mark.parametrize("width", WIDTHS)
def test_sweep_and_learned_tables_fit(width: int) -> None:
    from soupkit.soups.result import SoupResult, SweepPoint

    points = [SweepPoint(a / 10, {d: 0.9 + a / 1000 for d in DATASETS}, 0.9 + a / 1000, 0.91, 0.8, a == 3)
              for a in range(11)]
    sweep = SoupResult("wise_sweep", ["zs.pt", "ft.pt"], [0, 1], [0.9, 0.91], points, 0.903,
                       rule={"select": None}, extra={"alpha": 0.3})
    assert_fits(render(sweep.table(), width), width, *DATASETS, "90.30%", "0.3", "◀")
    learned = SoupResult("learned", [f"ckpt/run_{i}/last.pt" for i in range(3)], [0, 1, 2], [0.9, 0.8, 0.7], [],
                         0.95, extra={"weights": [0.5, 0.25, 0.25], "heldout_loss": 0.1, "uniform_loss": 0.2,
                                      "temperature": 1.0})
    lines = render(learned.table(), width)
    assert_fits(lines, width, "0.2500", "90.00%", "individual acc", "run_0/last", "ingredients: ckpt/*.pt")


@pytest.mark.parametrize("width", WIDTHS)
def test_demo_table_fits(width: int) -> None:
    from soupkit.demo import results_table

    columns = [*DATASETS, "mean_shift"]
    rows = {name: dict.fromkeys(columns, 0.987) for name in
            ("pretrained", *(f"finetuned_{i:02d}" for i in range(12)), "uniform soup", "WiSE-FT (alpha=0.3)")}
    lines = render(results_table(rows), width)
    assert_fits(lines, width, "98.7", "WiSE-FT α=0.3", "finetuned_11", *DATASETS)


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_diff_keys_are_never_confused_and_differences_come_first(tmp_path: Path, make_ckpt, cli,
                                                                       monkeypatch, width: int) -> None:
    keys = [f"encoder.layers.{i}.self_attention.query_projection.weight" for i in (10, 11)]
    a = {keys[0]: torch.ones(3), keys[1]: torch.ones(3), "bn.num_batches_tracked": torch.tensor(5)}
    b = {keys[0]: torch.ones(3) * 2, keys[1]: torch.ones(3), "bn.num_batches_tracked": torch.tensor(5)}
    monkeypatch.setenv("COLUMNS", str(width))
    result = cli("inspect", make_ckpt("a", state=a), "--diff", make_ckpt("b", state=b))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert all(len(line) <= width for line in lines), result.out
    assert "…" not in result.out  # keys are wrapped, never shortened: two keys cannot look the same
    tokens = re.findall(r"[\w.|]+", result.out)
    assert any(t.endswith("10.") or ".10." in t for t in tokens) and any(t.endswith("11.") or ".11." in t
                                                                          for t in tokens), result.out
    assert result.out.index("changed") < result.out.index("identical")  # integer buffers that match go last
    assert "over the 2 floating-point tensors they share" in result.out


def test_inspect_diff_of_unrelated_checkpoints_says_they_share_nothing(make_ckpt, cli) -> None:
    a = make_ckpt("a", state={"x.weight": torch.ones(2)})
    b = make_ckpt("b", state={"y.weight": torch.ones(2)})
    result = cli("inspect", a, "--diff", b)
    assert result.code == 0 and "share no floating-point tensors" in result.out and "L2 0" not in result.out
    report = json.loads(cli("inspect", a, "--diff", b, "--json").out)
    assert report["summary"]["l2"] is None and report["summary"]["shared_float_tensors"] == 0


# --------------------------------------------------------------------------------- reprs and --version


def test_eval_and_soup_results_print_short_summaries() -> None:
    from soupkit.eval.result import DatasetResult, EvalResult

    result = EvalResult({"heldout": DatasetResult("heldout", 975, 1000, torch.ones(100_000, dtype=torch.bool))},
                        1.25, "soup.safetensors")
    assert repr(result) == "EvalResult(soup.safetensors: heldout 97.50%; 1.2 s)"
    assert repr(result["heldout"]) == "DatasetResult('heldout', 97.50% of 1000)"
    text = repr(_greedy_result())
    assert len(text) < 400 and "tensor(" not in text, text
    assert text.startswith("SoupResult(greedy; held-out 98.57%; 2 of 4 ingredients") and "1 tensors" in text


def test_version_option_and_attribute(cli) -> None:
    from importlib.metadata import version

    import soupkit

    result = cli("--version")
    assert result.code == 0
    assert result.out.strip() == f"soupkit {version('soupkit')}" == f"soupkit {soupkit.__version__}"
    code = "import sys, soupkit; print(soupkit.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [soupkit.__version__, "False"]


# ------------------------------------------------------------------------------ progress and provenance


def test_evaluation_progress_only_on_a_terminal(capsys, monkeypatch) -> None:
    from soupkit.eval import Evaluator
    from tests.eval.helpers import digits_recipe, make_model

    evaluator = Evaluator.from_recipe(digits_recipe(), use_cache=False)
    state = make_model().state_dict()
    capsys.readouterr()
    evaluator.evaluate(state, ["heldout"], progress=True)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: silent
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    evaluator.evaluate(state, ["heldout"], progress=True)
    err = capsys.readouterr().err
    assert "eval candidate: heldout" in err and "batches, eta" in err


def test_provenance_records_names_not_machine_paths(tmp_path: Path) -> None:
    from soupkit.io.provenance import provenance_metadata

    names = [str(tmp_path / "runs" / f"ft_{i}.safetensors") for i in range(2)]
    for name in names:
        Path(name).parent.mkdir(exist_ok=True)
        Path(name).touch()
    record = {"order": names, "selected": names[:1], "scores": {n: 0.5 for n in names}}
    metadata = provenance_metadata("greedy_soup", {"accept": "gt"}, [], {"soupkit.greedy": record})
    assert str(tmp_path) not in json.dumps(metadata)
    assert json.loads(metadata["soupkit.greedy"]) == {
        "order": ["ft_0.safetensors", "ft_1.safetensors"], "selected": ["ft_0.safetensors"],
        "scores": {"ft_0.safetensors": 0.5, "ft_1.safetensors": 0.5}}


def test_atomic_small_file_writes(tmp_path: Path) -> None:
    from soupkit.errors import OutputError
    from soupkit.io.atomic import atomic_write_text

    target = atomic_write_text(tmp_path / "new" / "report.json", "{}\n")
    assert target.read_text() == "{}\n" and [p.name for p in target.parent.iterdir()] == ["report.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"file/report.json: "):
        atomic_write_text(tmp_path / "file" / "report.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "new"]


# ------------------------------------------------------------------------------------------------ plots


def _capture(monkeypatch) -> list:
    from soupkit.report import plots

    figures: list = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.append(figure) or Path(path))
    return figures


def _boxes(axes) -> list:
    renderer = axes.figure.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in axes.texts]


def test_wise_curve_labels_never_overlap_and_axes_are_in_percent(monkeypatch) -> None:
    from matplotlib.ticker import PercentFormatter

    from soupkit.report.plots import plot_wise_curve
    from soupkit.soups.result import SweepPoint

    # a crowded curve: several α at nearly the same place, two exactly equal
    points = [SweepPoint(a / 10, {}, 0.9, 0.95 + 0.0004 * min(a, 6), 0.9 - 0.0005 * a * a, a == 3)
              for a in range(11)]
    points[1] = SweepPoint(0.1, {}, 0.9, points[0].test, points[0].shift)
    figures = _capture(monkeypatch)
    plot_wise_curve(points, "unused.png")
    left, right = figures[0].axes[:2]
    boxes = _boxes(left)
    texts = [text for text, _ in boxes]
    assert any(t.startswith("zero-shot (α=0), α=0.1") for t in texts) and "fine-tuned (α=1)" in texts
    assert "α=0.3" in texts  # the chosen one is always labelled
    for i, (_, box) in enumerate(boxes):
        for _, other in boxes[i + 1:]:
            assert not box.overlaps(other), texts
    legend = left.get_legend().get_window_extent(figures[0].canvas.get_renderer())
    assert not any(box.overlaps(legend) for _, box in boxes)
    assert isinstance(left.xaxis.get_major_formatter(), PercentFormatter)
    assert isinstance(right.yaxis.get_major_formatter(), PercentFormatter)


def test_soup_scatter_shows_every_kind_and_names_the_best_ingredient(monkeypatch) -> None:
    from soupkit.report.plots import plot_soup_scatter

    points = [{"label": f"ft_{i}", "kind": "ingredient", "test": 0.9 + i / 100, "shift": 0.7, "heldout": 0.8 + i / 50}
              for i in range(4)]
    points += [{"label": "zs", "kind": "zeroshot", "test": 0.9, "shift": 0.9},
               {"label": "WiSE-FT α=0.3", "kind": "wise", "test": 0.93, "shift": 0.85},
               {"label": "learned soup", "kind": "learned", "test": 0.94, "shift": 0.72}]
    figures = _capture(monkeypatch)
    plot_soup_scatter(points, "unused.png")
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["fine-tuned ingredients", "best ingredient on held-out: ft_3", "zero-shot", "WiSE-FT α=0.3",
                      "learned soup"]


def test_greedy_steps_draw_an_early_stop_as_an_upper_bound(monkeypatch) -> None:
    from matplotlib.container import ErrorbarContainer

    from soupkit.report.plots import plot_greedy_steps

    figures = _capture(monkeypatch)
    plot_greedy_steps(_greedy_result(), "unused.png")
    axes = figures[0].axes[0]
    bounds = [c for c in axes.containers if isinstance(c, ErrorbarContainer)]
    assert len(bounds) == 1 and bounds[0].has_yerr
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert "soup + ingredient: stopped early, proven no better than the soup (upper bound)" in legend
    assert axes.get_xticklabels()[0].get_text().endswith("seed2")


# ------------------------------------------------------------------------------------------------ messages


@pytest.mark.parametrize("content", [b"garbage\n", b"Iarbage\n", b"this is not a checkpoint\n"])
def test_a_garbage_pt_is_named_not_a_torch_checkpoint_without_parser_words(tmp_path: Path, cli, content) -> None:
    path = tmp_path / "g.pt"
    path.write_bytes(content)
    result = cli("inspect", path)
    assert result.code == 2
    assert result.err.strip() == (f"soupkit inspect: error: {path}: not a valid torch checkpoint: its bytes are "
                                  "neither a torch.save zip archive nor a pickled state dict")


def test_check_fits_names_the_checkpoint_file(make_ckpt) -> None:
    from soupkit.errors import CheckpointError
    from soupkit.eval import Evaluator
    from tests.eval.helpers import digits_recipe

    evaluator = Evaluator.from_recipe(digits_recipe(), use_cache=False)
    wrong = make_ckpt("wrong", state={"features.0.weight": torch.ones(2)})
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(wrong))}: does not fit the recipe's model"):
        evaluator.check_fits(wrong)
    state = {k: v.contiguous() for k, v in evaluator.model.state_dict().items()}
    evaluator.check_fits(make_ckpt("right", state=state))
