"""Every --help reads well at 80 columns: nothing wider, no type placeholders (<bool>, <list[Path]>, {checkpoints}),
the same short flag for the same option everywhere, and help text that names its own command."""

from __future__ import annotations

import re

import pytest

from soupkit.cli import main


def commands() -> list[str]:
    import typer

    from soupkit.cli import app

    return sorted(typer.main.get_command(app).commands)


def render(args: list[str], capsys) -> str:
    capsys.readouterr()
    try:
        main(args)
    except SystemExit:
        pass
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [None, *commands()])
def test_help_fits_80_columns_without_placeholders(command: str | None, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = render([command, "--help"] if command else ["--help"], capsys)
    assert text.strip(), command
    widths = [len(line) for line in text.splitlines()]
    assert max(widths) <= 80, (command, max(widths))
    for placeholder in ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list"):
        assert placeholder not in text, (command, placeholder)
    assert not re.search(r"\{[A-Za-z]", text), command  # typer's {ARGUMENT} usage placeholders
    if command:
        others = [c for c in commands() if c != command and len(c) > 4]
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert f"soupkit {command}" in usage and not any(f"soupkit {o} " in usage for o in others)


def test_the_same_option_has_the_same_short_flag_everywhere(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    shorts: dict[str, set[str]] = {}
    for command in commands():
        for long, short in re.findall(r"(--[a-z][a-z-]*)\s+(-[a-zA-Z])\s", render([command, "--help"], capsys)):
            shorts.setdefault(long, set()).add(short)
    assert shorts["--eval"] == {"-e"} and shorts["--output"] == {"-o"} and shorts["--quiet"] == {"-q"}
    assert all(len(s) == 1 for s in shorts.values()), shorts


def test_every_command_that_evaluates_takes_the_cache_flags(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("merge", "wise", "eval", "doctor"):
        text = render([command, "--help"], capsys)
        assert "--no-cache" in text and "--cache-dir" in text and "--eval" in text, command


def test_version(capsys) -> None:
    import soupkit

    assert render(["--version"], capsys).strip() == f"soupkit {soupkit.__version__}"


def test_methods_listing_fits_80_columns(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = render(["methods"], capsys)
    assert "ties" in text and "greedy" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    one = render(["methods", "ties"], capsys)
    assert "--density" in one and "https://arxiv.org/abs/2306.01708" in one
