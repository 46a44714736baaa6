"""``python -m soupkit`` runs the CLI."""

from soupkit.cli import main

main()
