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
from soupkit.io import open_checkpoint, save_checkpoint

SHIFTS = ("noise", "rotation", "blur", "inversion", "occlusion")
IMAGE_SIZE = 16
# 35% of the 1348 training digits (472 images) held out: with the default 20% (270 images) accuracy ties are
# frequent enough to stall the greedy soup's strict-improvement rule.
HOLDOUT = 0.35
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

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "models": self.rows, "ingredients": self.ingredients,
                "greedy": self.greedy, "learned": self.learned, "wise": self.wise, "doctor": self.doctor,
                "summary": self.summary,
                "files": self.files, "seconds": round(self.seconds, 1)}


def demo_recipe(device: str, seed: int) -> dict[str, Any]:
    """The evaluation recipe the demo uses (the same data as ``recipes/digits.yaml``)."""
    digits = {"kind": "digits", "size": IMAGE_SIZE, "seed": seed, "holdout": HOLDOUT}
    return {
        "model": {"kind": "python", "factory": "soupkit.demo_train:digits_cnn", "num_classes": 10},
        "data": {
            "heldout": {**digits, "split": "heldout"},
            "test": {"clean": {**digits, "split": "test"},
                     **{shift: {**digits, "split": "test", "shift": shift} for shift in SHIFTS}},
        },
        "batch_size": 512,
        "device": device,
        "precision": "fp32",
    }


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
    from soupkit.eval import Evaluator
    from soupkit.eval.data.digits import load_digits_split

    (out / "ingredients").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if quick:
        ingredients = min(ingredients, 4)
    result = DemoResult(out=out, config={"ingredients": ingredients, "seed": seed, "quick": quick,
                                         "image_size": IMAGE_SIZE, "holdout": HOLDOUT, "device": device})

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

    # 4. soups, through the library calls a user makes
    evaluator = Evaluator.from_recipe(demo_recipe(device, seed), cache_dir=out / "cache")

    def score(label: str, state: Any) -> dict[str, float]:
        accuracies = evaluator(state)
        row = {name: accuracies.accuracy(name) for name in evaluator.dataset_names}
        row["mean_shift"] = sum(row[s] for s in evaluator.shift_names) / len(evaluator.shift_names)
        result.rows[label] = row
        return row

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
    result.greedy = {"ingredients": [paths[i].name for i in greedy.ingredients], **_jsonable(greedy.to_dict())}
    log("learned soup")
    learned = soupkit.learned_soup(paths, evaluator, output=out / "learned_soup.safetensors", force=True,
                                   report_dir=out, progress=progress)
    score("learned soup", out / "learned_soup.safetensors")
    result.learned = _jsonable(learned.to_dict())
    log("WiSE-FT sweep: pretrained -> best fine-tuned")
    alphas = [round(0.1 * i, 1) for i in range(11)]
    wise = soupkit.wise_sweep(pretrained_path, best, alphas, evaluator, output=out / "wise.safetensors", force=True,
                              report_dir=out, progress=progress)
    score(f"WiSE-FT (alpha={wise.alpha:.1f})", out / "wise.safetensors")
    result.wise = _jsonable(wise.to_dict())

    log("doctor: will these ingredients soup?")
    doctor = soupkit.doctor(paths, base=pretrained_path, evaluator=evaluator, plot=out / "doctor_angles.png")
    result.doctor = _jsonable(doctor.to_dict())

    # 5. report
    result.summary = (summarize(result.rows, best.stem, f"WiSE-FT (alpha={wise.alpha:.1f})")
                      + f" soupkit doctor: {doctor.overall} ({doctor.overall_reason}).")
    result.seconds = time.perf_counter() - started
    result.files = {p.name: str(p) for p in sorted(out.glob("*.png"))}
    (out / "demo.json").write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    return result


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
    table.add_column("model", no_wrap=True)
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    best = {c: max(row[c] for row in rows.values()) for c in columns}
    for label, row in rows.items():
        cells = [(f"[bold]{100 * row[c]:.1f}[/bold]" if row[c] == best[c] else f"{100 * row[c]:.1f}") for c in columns]
        table.add_row(label, *cells)
    return table
