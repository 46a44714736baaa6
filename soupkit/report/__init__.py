"""Reports for soups and sweeps: rich tables (``tables``) and matplotlib plots (``plots``).

Both modules import rich / matplotlib inside their functions, so importing ``soupkit.report`` costs nothing.
The CLI and the demo render results with these same functions.
"""
