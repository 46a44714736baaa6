"""``soupkit report``: one self-contained HTML page per run, readable offline, checked in headless Chromium
(Debian's ``chromium``; skipped when /usr/bin/chromium is absent) through its DOM and a screenshot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from soupkit import greedy_soup, wise_sweep
from soupkit.io import save_checkpoint

CHROMIUM = "/usr/bin/chromium"


def score(state: dict) -> float:
    return float(1.0 / (1.0 + (state["w"] - 1.0).abs().mean()))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a greedy soup and a WiSE-FT sweep with their records and plots."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    paths = [save_checkpoint({"w": torch.rand(8) + i * 0.1}, folder / f"ft_{i}.safetensors") for i in range(3)]
    greedy_soup(paths, score, output=folder / "soup.safetensors", report_dir=folder)
    wise_sweep(paths[0], paths[1], [0.0, 0.5, 1.0], score, output=folder / "wise.safetensors", report_dir=folder)
    return folder


def test_one_page_per_run_self_contained(run_dir: Path, cli) -> None:
    result = cli("report", run_dir)
    assert result.code == 0, result.err
    pages = sorted(p.name for p in run_dir.glob("*.html"))
    assert pages == ["soup.html", "wise.html"]
    for name in pages:
        text = (run_dir / name).read_text()
        assert "data:image/png;base64," in text
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), name  # nothing from the network
        assert "<script" not in text
    record = json.loads((run_dir / "soup.json").read_text())
    soup = (run_dir / "soup.html").read_text()
    for step in record["history"]:
        assert f"<td>{step['name']}</td>" in soup
    assert "soupkit.method" in soup  # the provenance, read from the soup's own metadata
    again = cli("report", run_dir)
    assert again.code == 2 and "exists" in again.err and "--force" in again.err
    assert cli("report", run_dir, "--force").code == 0
    one = cli("report", run_dir / "wise.json", "-o", run_dir / "w.html")
    assert one.code == 0 and (run_dir / "w.html").exists()
    none = cli("report", run_dir / "ft_0.safetensors")
    assert none.code == 2 and "no run found" in none.err


def test_a_broken_record_is_one_line(tmp_path: Path, cli) -> None:
    for number, text in enumerate(('{"method": "greedy", "history": 3}', '{"method": "greedy", "history": []}',
                                   '{"method": "wise_sweep", "history": [{"alpha": "x"}]}')):
        record = tmp_path / f"r{number}.json"
        record.write_text(text)
        result = cli("report", record)
        assert result.code == 2 and result.err.count("\n") == 1, result.err
        assert str(record) in result.err and "Traceback" not in result.err
        assert not record.with_suffix(".html").exists()


def test_a_library_soup_page_says_it_has_no_command(tmp_path: Path, cli) -> None:
    """(A CLI soup's record keeps its command line: tests/soups/test_report_files.py checks it.)"""
    torch.manual_seed(0)
    a = save_checkpoint({"w": torch.rand(8)}, tmp_path / "a.safetensors")
    b = save_checkpoint({"w": torch.rand(8) + 0.5}, tmp_path / "b.safetensors")
    greedy_soup([a, b], score, output=tmp_path / "s.safetensors", report_dir=tmp_path)
    assert cli("report", tmp_path / "s.json").code == 0
    assert "library call" in (tmp_path / "s.html").read_text()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(run_dir: Path, cli, tmp_path: Path) -> None:
    assert cli("report", run_dir, "--force").code == 0
    page = run_dir / "soup.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    record = json.loads((run_dir / "soup.json").read_text())
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", dom.stdout, flags=re.S)
    for step in record["history"]:  # every greedy step is a row of the rendered table
        assert any(f"<td>{step['name']}</td>" in row for row in rows), step
    assert dom.stdout.count("<img") >= 1 and "Greedy soup" in dom.stdout
    shot = tmp_path / "page.png"
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    done = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        colours = image.convert("L").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # a page with text and a plot, not a blank one
