"""The installed distribution's version (one source: pyproject.toml), read without importing torch. Its own
module, at the bottom of the layers, so that provenance records (``soupkit.io``) need not import the top package.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("soupkit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


__version__ = _version()
