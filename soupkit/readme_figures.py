"""The README's figures, made by a command: the demo table and what it shows, the CLI commands that reproduce
the demo's picks, the doctor example and the plots in ``docs/``, all from one ``soupkit demo`` run.

    python -m soupkit.readme_figures --write             # a fresh `soupkit demo` (default seed) in a temporary folder
    python -m soupkit.readme_figures --write --from DIR  # an existing demo folder (`soupkit demo --out DIR`)

It copies the run's ``demo.json`` to ``docs/demo.json`` and its plots to ``docs/``, then rewrites the README's
generated blocks (between ``<!-- generated: NAME ... -->`` and ``<!-- end of generated NAME -->``) from
``docs/demo.json`` alone, so ``tests/docs/test_readme.py`` can check that the README says what that record holds.
The prose in the blocks is computed from the numbers: it says what they show, whatever they show.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from soupkit.demo import run_demo
from soupkit.diagnosis.report import DoctorReport
from soupkit.io.atomic import atomic_write_text
from soupkit.report.html import best_ingredient

ROOT = Path(__file__).resolve().parents[2]
DEMO_JSON = "docs/demo.json"
#: the demo's plots the README shows: name in docs/ -> name in the demo's folder
PLOTS = {"wise_curve.png": "wise_curve.png", "soup_scatter.png": "soup_scatter.png",
         "greedy_steps.png": "greedy_soup_steps.png", "doctor_angles.png": "doctor_angles.png"}
#: the folder the README's commands use (``soupkit demo``'s default ``--out``)
DEMO_DIR = "soupkit-demo"
#: the width the doctor example is rendered at (a README code block shows ~100 columns without scrolling)
DOCTOR_WIDTH = 100
COMMAND = "python -m soupkit.readme_figures --write"


def begin(name: str) -> str:
    return f"<!-- generated: {name}, by `{COMMAND}` from {DEMO_JSON}; do not edit by hand -->"


def end(name: str) -> str:
    return f"<!-- end of generated {name} -->"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _wise_label(models: dict[str, Any]) -> str:
    return next(name for name in models if name.startswith("WiSE-FT"))


def demo_table(data: dict[str, Any]) -> str:
    """The Markdown table of the demo's models: held-out, clean test and the mean of the shifts, in %."""
    models, n = data["models"], len(data["ingredients"])
    shifts = len([k for k in models["pretrained"] if k not in ("heldout", "clean", "mean_shift")])
    wise = _wise_label(models)
    rows = [("pretrained (the \"zero-shot\" model)", "pretrained"),
            (f"best fine-tuned ingredient (of {n}: {best_ingredient(data)})", "best individual"),
            (f"uniform soup ({n} ingredients)", "uniform soup"),
            (f"greedy soup ({len(data['greedy']['ingredients'])} ingredient"
             f"{'s' if len(data['greedy']['ingredients']) != 1 else ''})", "greedy soup"),
            ("learned soup", "learned soup"),
            (f"WiSE-FT, α = {data['wise']['extra']['alpha']:.1f} (chosen on held-out)", wise)]
    lines = [f"| model | held-out | clean test | mean of {shifts} shifts |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {label} | {_pct(models[key]['heldout'])} | {_pct(models[key]['clean'])} | "
              f"{_pct(models[key]['mean_shift'])} |" for label, key in rows]
    return "\n".join(lines)


def _compare(a: float, b: float) -> str:
    """How ``a`` compares with ``b`` at the table's precision (0.1 point)."""
    diff = round(100 * a, 1) - round(100 * b, 1)
    if abs(diff) < 0.05:
        return "ties"
    return "beats" if diff > 0 else "is below"


def demo_findings(data: dict[str, Any]) -> str:
    """What the table shows, computed from it: each sentence a comparison the numbers make, true or not to the
    papers' pattern."""
    models = data["models"]
    pre, top, uniform = models["pretrained"], models["best individual"], models["uniform soup"]
    greedy, learned, wise = models["greedy soup"], models["learned soup"], models[_wise_label(models)]
    alpha = data["wise"]["extra"]["alpha"]
    kept = len(data["greedy"]["ingredients"])

    def pts(a: float, b: float) -> str:
        return f"{round(100 * a, 1) - round(100 * b, 1):+.1f}"

    lost = pre["mean_shift"] - top["mean_shift"]
    parts = [f"Fine-tuning on clean digits moves clean test accuracy by {pts(top['clean'], pre['clean'])} points "
             f"(best ingredient vs the pretrained model) and accuracy under shift by "
             f"{pts(top['mean_shift'], pre['mean_shift'])} points."]
    gain = wise["mean_shift"] - top["mean_shift"]
    sentence = (f"WiSE-FT at α = {alpha:.1f} scores {_pct(wise['clean'])} % on clean test digits "
                f"({pts(wise['clean'], top['clean'])} against the best ingredient) and "
                f"{pts(wise['mean_shift'], top['mean_shift'])} points under shift")
    if lost > 0 and gain > 0:
        sentence += f": it recovers {min(100.0, 100 * gain / lost):.0f} % of the robustness fine-tuning lost"
    parts.append(sentence + ".")
    parts.append(f"The greedy soup keeps {kept} of {len(data['ingredients'])} ingredients; on held-out data it "
                 f"{_compare(greedy['heldout'], top['heldout'])} the best ingredient "
                 f"({_pct(greedy['heldout'])} vs {_pct(top['heldout'])}) and "
                 f"{_compare(greedy['heldout'], uniform['heldout'])} the uniform soup "
                 f"({_pct(uniform['heldout'])}); on the clean test set it "
                 f"{_compare(greedy['clean'], top['clean'])} the best ingredient "
                 f"({_pct(greedy['clean'])} vs {_pct(top['clean'])}), and under shift it scores "
                 f"{_pct(greedy['mean_shift'])} vs {_pct(top['mean_shift'])}.")
    parts.append(f"The uniform soup of all {len(data['ingredients'])} {_compare(uniform['heldout'], top['heldout'])} "
                 f"the best ingredient on held-out data ({_pct(uniform['heldout'])}); the learned soup "
                 f"{_compare(learned['heldout'], top['heldout'])} it ({_pct(learned['heldout'])}).")
    return " ".join(parts)


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=115, break_long_words=False, break_on_hyphens=False)


def demo_section(data: dict[str, Any]) -> str:
    return f"{demo_table(data)}\n\n{_wrap(demo_findings(data))}"


def commands_section(data: dict[str, Any]) -> str:
    """The CLI commands that reproduce the demo's greedy soup and WiSE-FT sweep on its files."""
    best = best_ingredient(data)
    return "\n".join([
        "```bash",
        f"soupkit merge --method greedy {DEMO_DIR}/ingredients/*.safetensors \\",
        f"    --eval {DEMO_DIR}/recipe.yaml -o greedy.safetensors",
        f"# the demo prints its best ingredient (\"best individual by held-out accuracy: {best}\" in the run below)",
        f"soupkit wise {DEMO_DIR}/pretrained.safetensors {DEMO_DIR}/ingredients/{best}.safetensors \\",
        f"    --alpha 0:1:0.1 --eval {DEMO_DIR}/recipe.yaml -o wise.safetensors",
        "```",
    ])


def doctor_report(data: dict[str, Any]) -> Any:
    """The demo's doctor report as the CLI run on the demo's folder gives it (names under ``soupkit-demo/``)."""

    doctor = json.loads(json.dumps(data["doctor"]).replace('"ingredients/', f'"{DEMO_DIR}/ingredients/')
                        .replace('"pretrained.safetensors', f'"{DEMO_DIR}/pretrained.safetensors'))
    return DoctorReport.from_dict(doctor)


DOCTOR_COMMAND = (f"soupkit doctor {DEMO_DIR}/ingredients/*.safetensors --base {DEMO_DIR}/pretrained.safetensors "
                  f"--eval {DEMO_DIR}/recipe.yaml")


def doctor_output(report: Any, width: int = DOCTOR_WIDTH) -> str:
    """What ``soupkit doctor`` prints for ``report`` on a ``width``-column pipe, trailing spaces stripped."""
    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), color_system=None, highlight=False)
    report.print(console)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def doctor_findings(report: Any) -> str:
    """What the demo's doctor report shows, computed from it."""
    verdicts: dict[str, int] = {}
    for word in report.verdict.values():
        verdicts[word] = verdicts.get(word, 0) + 1
    counts = ", ".join(f"{n} {word}" for word, n in sorted(verdicts.items(), key=lambda kv: -kv[1]))
    norms = [v for v in report.norm if v is not None and math.isfinite(v)]
    parts = [f"On the demo's {len(report.names)} ingredients (one start, random hyperparameters, task-vector norms "
             f"{min(norms):.1f}–{max(norms):.1f}) the verdicts are: {counts}."]
    if report.barrier:
        worst = max(report.barrier, key=lambda n: report.barrier[n])
        parts.append(f"The largest barrier is {100 * report.barrier[worst]:.1f} points "
                     f"({Path(worst).name.removesuffix('.safetensors')}).")
    parts.append(f"Overall: *{report.overall}*, because {report.overall_reason}.")
    return " ".join(parts)


def doctor_section(data: dict[str, Any]) -> str:
    report = doctor_report(data)
    return "\n".join(["```", f"$ {DOCTOR_COMMAND}", doctor_output(report), "```", "", _wrap(doctor_findings(report))])


SECTIONS = {"demo table": demo_section, "demo commands": commands_section, "doctor example": doctor_section}


def generated(text: str, name: str) -> str | None:
    """The body of the generated block ``name`` in ``text`` (None when its markers are missing)."""
    start, stop = begin(name), end(name)
    if start not in text or stop not in text:
        return None
    return text.split(start, 1)[1].split(stop, 1)[0].strip("\n")


def render(text: str, data: dict[str, Any]) -> str:
    """``text`` with every generated block rewritten from ``data``; a missing block is an error."""
    for name, make in SECTIONS.items():
        old = generated(text, name)
        if old is None:
            raise SystemExit(f"README.md: the markers of the generated block {name!r} are missing ({begin(name)})")
        head, rest = text.split(begin(name), 1)
        text = f"{head}{begin(name)}\n{make(data)}\n{end(name)}{rest.split(end(name), 1)[1]}"
    return text


def regenerate(root: Path = ROOT, demo_dir: Path | None = None, log: Any = print) -> list[Path]:
    """Run a fresh demo (default seed; or use ``demo_dir``), copy its record and plots to ``docs/`` and rewrite
    the README's generated blocks. Returns the files written."""

    with tempfile.TemporaryDirectory(prefix="soupkit-readme-") as scratch:
        if demo_dir is None:
            demo_dir = Path(scratch) / DEMO_DIR
            log(f"running a fresh `soupkit demo` in {demo_dir} (a minute or two)")
            run_demo(demo_dir, log=log)
        written = []
        for name, source in {"demo.json": "demo.json", **PLOTS}.items():
            target = root / "docs" / name
            shutil.copyfile(Path(demo_dir) / source, target)
            written.append(target)
    data = json.loads((root / DEMO_JSON).read_text())
    readme = root / "README.md"
    atomic_write_text(readme, render(readme.read_text(), data))
    return [*written, readme]


def main(argv: list[str]) -> int:
    if "--write" not in argv:
        data = json.loads((ROOT / DEMO_JSON).read_text())
        print("\n\n".join(make(data) for make in SECTIONS.values()))
        return 0
    demo_dir = Path(argv[argv.index("--from") + 1]) if "--from" in argv else None
    for path in regenerate(ROOT, demo_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
