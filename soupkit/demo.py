"""``soupkit demo``: the whole story end to end on bundled data, in a couple of minutes on a laptop CPU.

1. Data: scikit-learn's bundled digits (no download). In-distribution = clean test digits; shifts = the
   evaluator's named corruptions of the test split; a held-out split taken from the training set.
2. A "pretrained" model: a small CNN trained on a broad, heavily corrupted version of the training data — the
   stand-in for a robust zero-shot model.
3. K ingredients fine-tuned from it on clean images only, with a random hyperparameter search.
4. Soups through the same library calls a user makes: best individual, uniform, greedy, learned, and a WiSE-FT
   sweep between the pretrained model and the best fine-tuned one.
5. A table, a JSON of every number, the two paper-style plots and a plain-language summary of what happened —
   whatever happened: the demo is never tuned to reproduce the papers' result.

Re-running with the same options reuses the trained models (matched by a hash of the training configuration)
and the evaluator's score cache.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import soupkit
from soupkit.demo_train import FinetuneConfig, digits_cnn, random_shift, train
from soupkit.eval import Evaluator
from soupkit.eval.data.digits import load_digits_split
from soupkit.eval.recipe import find_recipe
from soupkit.io import open_checkpoint, save_checkpoint
from soupkit.io.atomic import atomic_write_text
from soupkit.report.layout import name_cell
from soupkit.report.plots import plot_soup_scatter
from soupkit.yaml_file import read_yaml

SHIFTS = ("noise", "rotation", "blur", "inversion", "occlusion")
IMAGE_SIZE = 16
RECIPE = "digits"  # the bundled recipe the demo evaluates through: one source of truth for its data


def bundled_recipe() -> dict[str, Any]:
    """The bundled ``digits`` recipe as a mapping (``soupkit/recipes/digits.yaml``)."""

    return read_yaml(find_recipe(RECIPE), "recipe")


# the fraction of training digits held out for selection: the demo trains on the rest
HOLDOUT = float(bundled_recipe()["data"]["heldout"]["holdout"])
PRETRAIN = {"epochs": 30, "lr": 3e-3, "weight_decay": 1e-4}
QUICK_PRETRAIN = {"epochs": 8, "lr": 3e-3, "weight_decay": 1e-4}


@dataclass
class DemoResult:
    """Everything the demo measured; ``to_dict()`` is the JSON it writes."""

    out: Path
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> dataset -> accuracy
    ingredients: list[dict[str, Any]] = field(default_factory=list)
    greedy: dict[str, Any] = field(default_factory=dict)
    learned: dict[str, Any] = field(default_factory=dict)
    wise: dict[str, Any] = field(default_factory=dict)
    doctor: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # per soup: timings, memory, output paths

    def to_dict(self) -> dict[str, Any]:
        """``demo.json``: every number, and nothing that changes between runs with the same seed (no timings,
        no paths of this machine, no memory figures), so the same ``--seed`` gives a byte-identical file."""
        return {"config": self.config, "models": self.rows, "ingredients": self.ingredients,
                "greedy": self.greedy, "learned": self.learned, "wise": self.wise, "doctor": self.doctor,
                "summary": self.summary, "files": sorted(self.files)}

    def run_dict(self) -> dict[str, Any]:
        """``demo_run.json``: what this particular run measured (seconds, memory) and where it wrote."""
        return {"out": str(self.out), "seconds": round(self.seconds, 1), "files": self.files, "soups": self.run,
                "torch": torch.__version__}

    def write(self) -> None:
        """Write ``demo.json`` (reproducible) and ``demo_run.json`` (this run) into ``out``, atomically."""

        atomic_write_text(self.out / "demo.json", json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        atomic_write_text(self.out / "demo_run.json", json.dumps(self.run_dict(), indent=2, sort_keys=True) + "\n")


#: the parts of a soup's record that differ between identical runs: they go to demo_run.json
_RUN_KEYS = ("stats", "path", "report_files", "command")


def split_record(soup: Any, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A soup result as (reproducible record, this run's record): timings, memory and output paths move to the
    second, and every path under ``out`` becomes relative to it (``ingredients/finetuned_03.safetensors``)."""
    data = _portable(_jsonable(soup.to_dict()), str(out))
    run = {key: data.pop(key) for key in _RUN_KEYS if key in data}
    return data, run


def _portable(value: Any, root: str) -> Any:
    """``value`` with every string that is a path under ``root`` made relative to it."""
    prefix = root.rstrip("/") + "/"
    if isinstance(value, str):
        return value[len(prefix):] if value.startswith(prefix) else value
    if isinstance(value, dict):
        return {_portable(k, root): _portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, root) for v in value]
    return value


def demo_recipe(device: str, seed: int) -> dict[str, Any]:
    """The evaluation recipe the demo uses: the bundled ``digits`` recipe with the run's data seed and device.
    ``run_demo`` writes it to ``out/recipe.yaml`` so the CLI can score the demo's files exactly as it did."""
    recipe = bundled_recipe()
    if seed != 0:
        for spec in (recipe["data"]["heldout"], *recipe["data"]["test"].values()):
            spec["seed"] = seed
    recipe["device"] = device
    return recipe


def write_recipe(recipe: dict[str, Any], path: Path) -> Path:
    """``recipe`` as YAML, with a header saying where it comes from and how to use it."""
    import yaml


    folder = path.parent
    header = (f"# The evaluation recipe `soupkit demo` used: the bundled {RECIPE!r} recipe with this run's seed and "
              "device.\n# Score the demo's files with the CLI exactly as the demo did, e.g.\n"
              f"#   soupkit merge --method greedy {folder}/ingredients/*.safetensors --eval {path} -o soup.safetensors"
              "\n")
    return atomic_write_text(path, header + yaml.safe_dump(recipe, sort_keys=False, width=120))


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _reuse(path: Path, config_hash: str) -> bool:
    """True if ``path`` was trained by this demo with exactly this configuration."""
    if not path.exists():
        return False
    try:
        with open_checkpoint(path) as reader:
            return reader.metadata.get("demo.config_hash") == config_hash
    except soupkit.SoupkitError:
        return False


def run_demo(out: str | Path = "soupkit-demo", *, ingredients: int = 12, seed: int = 0, quick: bool = False,
             device: str = "cpu", log: Callable[[str], None] = print, progress: bool = False) -> DemoResult:
    """Train, soup, evaluate and report; returns every number (also written to ``out/demo.json``)."""

    started = time.perf_counter()
    threads = torch.get_num_threads()
    # A 38k-parameter CNN gains nothing from intra-op threads, and on a busy machine OpenMP spinning makes
    # two threads ~50x slower than one.
    torch.set_num_threads(1)
    try:
        return _run(Path(out), ingredients, seed, quick, device, log, progress, started)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, ingredients: int, seed: int, quick: bool, device: str, log: Callable[[str], None],
         progress: bool, started: float) -> DemoResult:
    (out / "ingredients").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if quick:
        ingredients = min(ingredients, 4)
    result = DemoResult(out=out, config={"ingredients": ingredients, "seed": seed, "quick": quick,
                                         "image_size": IMAGE_SIZE, "holdout": HOLDOUT, "device": device})
    pretrained_path, paths = _train(result, ingredients, seed, quick, log)
    _soups(result, pretrained_path, paths, demo_recipe(device, seed), log, progress)
    result.seconds = time.perf_counter() - started
    # every file the run wrote beside demo.json (checkpoints, soups' reports, plots, the recipe), for the listing
    result.files = {p.name: str(p) for p in sorted(out.iterdir())
                    if p.is_file() and p.name not in ("demo.json", "demo_run.json")}
    result.write()
    return result


def _train(result: DemoResult, ingredients: int, seed: int, quick: bool, log: Callable[[str], None]
           ) -> tuple[Path, list[Path]]:
    """Steps 1-3: the pretrained model and the fine-tuned ingredients (reused when already trained)."""

    out = result.out
    train_x, train_y = load_digits_split("train", size=IMAGE_SIZE, seed=seed, holdout=HOLDOUT)
    corrupted = [load_digits_split("train", shift=s, size=IMAGE_SIZE, seed=seed, holdout=HOLDOUT) for s in SHIFTS]
    broad_x = torch.cat([train_x, *(x for x, _ in corrupted)])
    broad_y = torch.cat([train_y, *(y for _, y in corrupted)])

    # 2. the "pretrained" model: broad, corrupted data
    pretrain = QUICK_PRETRAIN if quick else PRETRAIN
    pre_hash = _config_hash({"stage": "pretrain", "seed": seed, **pretrain, "n": len(broad_x)})
    pretrained_path = out / "pretrained.safetensors"
    if _reuse(pretrained_path, pre_hash):
        log(f"reusing {pretrained_path}")
    else:
        log(f"pretraining on {len(broad_x)} clean + corrupted digits ({pretrain['epochs']} epochs)")
        torch.manual_seed(seed)
        model = train(digits_cnn(), broad_x, broad_y, seed=seed, **pretrain)
        save_checkpoint(model.state_dict(), pretrained_path, {"demo.stage": "pretrained",
                                                              "demo.config_hash": pre_hash}, force=True)

    # 3. ingredients: fine-tuned on clean images only, random hyperparameters
    rng = random.Random(seed)
    paths: list[Path] = []
    for number in range(ingredients):
        config = FinetuneConfig.sample(rng, seed=seed * 1000 + number, quick=quick)
        path = out / "ingredients" / f"finetuned_{number:02d}.safetensors"
        ft_hash = _config_hash({"stage": "finetune", "pre": pre_hash, **config.to_metadata()})
        result.ingredients.append({"name": path.name, **asdict(config)})
        paths.append(path)
        if _reuse(path, ft_hash):
            continue
        log(f"fine-tuning ingredient {number + 1}/{ingredients}: lr={config.lr:g} wd={config.weight_decay:g} "
            f"epochs={config.epochs} smoothing={config.label_smoothing:g} augment={config.augment:g}")
        model = digits_cnn()
        model.load_state_dict(soupkit.load_checkpoint(pretrained_path))
        torch.manual_seed(config.seed)
        train(model, train_x, train_y, epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
              label_smoothing=config.label_smoothing, seed=config.seed,
              augment=lambda x, g, s=config.augment: random_shift(x, s, g))
        save_checkpoint(model.state_dict(), path, {**config.to_metadata(), "demo.config_hash": ft_hash}, force=True)
    return pretrained_path, paths


def _soups(result: DemoResult, pretrained_path: Path, paths: list[Path], recipe: dict[str, Any],
           log: Callable[[str], None], progress: bool) -> None:
    """Steps 4-5: every model scored through the recipe (written to ``out/recipe.yaml``), the soups made
    through the library calls a user makes, and the summary and the all-soups scatter."""

    out = result.out
    write_recipe(recipe, out / "recipe.yaml")
    evaluator = Evaluator.from_recipe(recipe, cache_dir=out / "cache")

    def score(label: str, state: Any) -> None:
        accuracies = evaluator(state)
        row = {name: accuracies.accuracy(name) for name in evaluator.dataset_names}
        row["mean_shift"] = sum(row[s] for s in evaluator.shift_names) / len(evaluator.shift_names)
        result.rows[label] = row

    score("pretrained", pretrained_path)
    for path in paths:
        score(path.stem, path)
    best = max(paths, key=lambda p: result.rows[p.stem]["heldout"])
    log(f"best individual by held-out accuracy: {best.name}")
    result.rows["best individual"] = dict(result.rows[best.stem])
    score("uniform soup", soupkit.uniform_soup(paths))
    log("greedy soup")
    greedy = soupkit.greedy_soup(paths, evaluator, output=out / "greedy_soup.safetensors", force=True,
                                 report_dir=out, progress=progress)
    score("greedy soup", out / "greedy_soup.safetensors")
    record, result.run["greedy"] = split_record(greedy, out)
    result.greedy = {**record, "ingredients": [paths[i].name for i in greedy.ingredients]}
    log("learned soup")
    learned = soupkit.learned_soup(paths, evaluator, output=out / "learned_soup.safetensors", force=True,
                                   report_dir=out, progress=progress)
    score("learned soup", out / "learned_soup.safetensors")
    result.learned, result.run["learned"] = split_record(learned, out)
    log("WiSE-FT sweep: pretrained -> best fine-tuned")
    alphas = [round(0.1 * i, 1) for i in range(11)]
    wise = soupkit.wise_sweep(pretrained_path, best, alphas, evaluator, output=out / "wise.safetensors", force=True,
                              report_dir=out, progress=progress)
    wise_label = f"WiSE-FT (alpha={wise.alpha:.1f})"
    score(wise_label, out / "wise.safetensors")
    result.wise, result.run["wise"] = split_record(wise, out)
    plot_all_soups(result.rows, [p.stem for p in paths], best.stem, wise_label, out / "soup_scatter.png")
    log("doctor: will these ingredients soup?")
    doctor = soupkit.doctor(paths, base=pretrained_path, evaluator=evaluator, plot=out / "doctor_angles.png")
    result.doctor = _portable(_jsonable(doctor.to_dict()), str(out))
    result.summary = (summarize(result.rows, best.stem, wise_label)
                      + f" soupkit doctor: {doctor.overall} ({doctor.overall_reason}).")


def plot_all_soups(rows: dict[str, dict[str, float]], ingredients: list[str], best: str, wise_label: str,
                   path: Path) -> Path:
    """The paper's scatter with everything the demo made: the zero-shot model, every ingredient (the best
    labelled), the uniform, greedy and learned soups and the chosen WiSE-FT point."""

    def point(row: str, kind: str, **extra: Any) -> dict[str, Any]:
        return {"label": row, "kind": kind, "test": rows[row]["clean"], "shift": rows[row]["mean_shift"], **extra}

    wise_point = point(wise_label, "wise", label=f"{wise_label.replace('alpha', 'α')}, chosen on held-out")
    points = [point(name, "ingredient", best=name == best) for name in ingredients]
    points += [point("pretrained", "zeroshot"), point("uniform soup", "uniform"), point("greedy soup", "greedy"),
               point("learned soup", "learned"), wise_point]
    return plot_soup_scatter(points, path, title="The demo's models: clean test vs distribution shift")


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def summarize(rows: dict[str, dict[str, float]], best: str, wise_label: str) -> str:
    """A plain-language paragraph of what the numbers show (computed, never canned)."""
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    pre, top = rows["pretrained"], rows["best individual"]
    uniform, greedy, wise = rows["uniform soup"], rows["greedy soup"], rows[wise_label]
    parts = [
        f"The pretrained model scores {pct(pre['clean'])} on clean test digits and {pct(pre['mean_shift'])} on "
        f"average under the five shifts; fine-tuning on clean images gives a best ingredient ({best}) of "
        f"{pct(top['clean'])} clean and {pct(top['mean_shift'])} under shift."
    ]
    for label, row in (("The uniform soup", uniform), ("The greedy soup", greedy)):
        verdict = "beats" if row["clean"] > top["clean"] else ("ties" if row["clean"] == top["clean"] else
                                                               "does not beat")
        parts.append(f"{label} {verdict} the best ingredient on clean test digits ({pct(row['clean'])} vs "
                     f"{pct(top['clean'])}; held-out {pct(row['heldout'])} vs {pct(top['heldout'])}) and scores "
                     f"{pct(row['mean_shift'])} under shift.")
    shift_gain = wise["mean_shift"] - top["mean_shift"]
    parts.append(
        f"{wise_label} keeps {pct(wise['clean'])} clean accuracy and "
        + (f"recovers {100 * shift_gain:.1f} points of robustness" if shift_gain > 0 else
           f"changes robustness by {100 * shift_gain:+.1f} points")
        + f" relative to the best fine-tuned model ({pct(wise['mean_shift'])} under shift)."
    )
    return " ".join(parts)


def results_table(rows: dict[str, dict[str, float]]) -> Any:
    """A rich table: every model and soup x held-out, clean test, each shift and the mean over shifts."""
    from rich.table import Table


    columns = list(next(iter(rows.values())))
    table = Table(title="soupkit demo: accuracy (%)")
    table.add_column("model")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right", no_wrap=True)
    best = {c: max(row[c] for row in rows.values()) for c in columns}
    for label, row in rows.items():
        cells = [(f"[bold]{100 * row[c]:.1f}[/bold]" if row[c] == best[c] else f"{100 * row[c]:.1f}") for c in columns]
        table.add_row(name_cell(label.replace(" (alpha=", " α=").removesuffix(")")), *cells)
    return table
