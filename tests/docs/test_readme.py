"""The README says what a run shows: its generated blocks (the demo table and what it shows, the commands that
reproduce the demo's picks, the doctor example) are exactly what ``python -m soupkit.readme_figures`` makes from
``docs/demo.json``, the record of a full default-seed ``soupkit demo``, whose plots are the ones in ``docs/``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soupkit import readme_figures as readme

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((ROOT / readme.DEMO_JSON).read_text())


def test_docs_demo_json_is_a_full_default_seed_run(record) -> None:
    assert record["config"]["seed"] == 0 and record["config"]["quick"] is False
    assert record["config"]["ingredients"] == 12 and len(record["ingredients"]) == 12
    assert record["files"] == sorted(record["files"])
    for name, source in readme.PLOTS.items():
        assert source in record["files"], source
        png = (ROOT / "docs" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize("name", sorted(readme.SECTIONS))
def test_readme_block_is_what_demo_json_gives(record, name: str) -> None:
    text = (ROOT / "README.md").read_text()
    body = readme.generated(text, name)
    assert body is not None, f"README.md lost the markers of {name!r}"
    assert body == readme.SECTIONS[name](record), (
        f"README.md's {name!r} differs from docs/demo.json: run `{readme.COMMAND}`")


def test_demo_table_numbers_are_the_records(record) -> None:
    """Independent of the generator: each row of the README table is the record's numbers, rounded."""
    table = readme.generated((ROOT / "README.md").read_text(), "demo table").split("\n\n")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    models = record["models"]
    wise = next(m for m in models if m.startswith("WiSE-FT"))
    for prefix, key in (("pretrained", "pretrained"), ("best fine-tuned", "best individual"),
                        ("uniform", "uniform soup"), ("greedy", "greedy soup"), ("learned", "learned soup"),
                        ("WiSE-FT", wise)):
        line = next(v for k, v in rows.items() if k.startswith(prefix))
        cells = [c.strip() for c in line.strip("| ").split("|")][1:]
        assert cells == [f"{100 * models[key][c]:.1f}" for c in ("heldout", "clean", "mean_shift")], line
    greedy = next(k for k in rows if k.startswith("greedy"))
    assert f"({len(record['greedy']['ingredients'])} ingredient" in greedy
    assert f"α = {record['wise']['extra']['alpha']:.1f}" in next(k for k in rows if k.startswith("WiSE-FT"))


def test_findings_follow_the_numbers_whatever_they_are(record) -> None:
    """Swap the greedy soup below the uniform soup: the prose says so instead of repeating the papers."""
    data = json.loads(json.dumps(record))
    data["models"]["greedy soup"]["heldout"] = data["models"]["uniform soup"]["heldout"] - 0.01
    text = readme.demo_findings(data)
    assert "is below the uniform soup" in text
    data["models"][next(m for m in data["models"] if m.startswith("WiSE-FT"))]["mean_shift"] = 0.0
    assert "recovers" not in readme.demo_findings(data)


def test_doctor_example_fits_its_width(record) -> None:
    body = readme.generated((ROOT / "README.md").read_text(), "doctor example")
    lines = body.splitlines()[2:-1]  # between the ``` and the $ command, and the closing ```
    lines = lines[:lines.index("```")]
    assert all(len(line) <= readme.DOCTOR_WIDTH for line in lines), body
