"""`soupkit demo --quick` end to end: the JSON's structure, real accuracies, reproducibility, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import soupkit
from soupkit.demo import HOLDOUT, IMAGE_SIZE, run_demo
from soupkit.demo_train import digits_cnn

MODELS = {"pretrained", "best individual", "uniform soup", "greedy soup", "learned soup"}
DATASETS = {"heldout", "clean", "noise", "rotation", "blur", "inversion", "occlusion", "mean_shift"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, quick=True, seed=0, log=lambda _: None)
    return out, json.loads((out / "demo.json").read_text())


def test_demo_json_structure_and_files(quick_run) -> None:
    out, report = quick_run
    assert set(report["models"]) >= MODELS and any(m.startswith("WiSE-FT (alpha=") for m in report["models"])
    for model, row in report["models"].items():
        assert set(row) == DATASETS, model
        for dataset, value in row.items():
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (model, dataset, value)
    assert len(report["ingredients"]) == 4 and report["greedy"]["ingredients"]
    assert report["summary"].startswith("The pretrained model scores")
    assert report["doctor"]["overall"] in report["summary"] and report["doctor"]["names"]
    assert set(report["doctor"]["verdict"].values()) <= {"soupable", "duplicate", "different_basin"}
    for name in ("greedy_scatter.png", "wise_curve.png", "doctor_angles.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    meta = soupkit.open_checkpoint(out / "ingredients" / "finetuned_00.safetensors").metadata
    assert float(meta["demo.lr"]) == report["ingredients"][0]["lr"]


def test_demo_accuracies_are_computed_from_the_data(quick_run) -> None:
    """Recompute the pretrained model's clean and held-out accuracy by hand: the JSON must match exactly."""
    from soupkit.eval.data.digits import load_digits_split

    out, report = quick_run
    model = digits_cnn()
    model.load_state_dict(soupkit.load_checkpoint(out / "pretrained.safetensors"))
    model.eval()
    for split, column in (("test", "clean"), ("heldout", "heldout")):
        images, labels = load_digits_split(split, size=IMAGE_SIZE, seed=0, holdout=HOLDOUT)
        with torch.no_grad():
            correct = (model(images).argmax(1) == labels).sum().item()
        assert report["models"]["pretrained"][column] == pytest.approx(correct / len(labels), abs=1e-12)


def test_demo_is_reproducible_and_reuses_work(quick_run, tmp_path: Path) -> None:
    _out, report = quick_run
    again = run_demo(tmp_path, quick=True, seed=0, log=lambda _: None).to_dict()
    assert again["models"] == report["models"] and again["ingredients"] == report["ingredients"]
    logged: list[str] = []
    run_demo(tmp_path, quick=True, seed=0, log=logged.append)
    assert not any(line.startswith(("pretraining", "fine-tuning")) for line in logged), logged
