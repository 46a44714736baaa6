"""Merging checkpoints: the method registry (torch-free, imported by the CLI to build its flags), the streaming
engine, the merge plan and its writers (``plan_merge``, ``WRITERS``) and the library calls (``merge``,
``uniform_soup``, ``wise_ft``). Public names load lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from soupkit._lazy import lazy_exports

_LAZY = {
    "merge": "soupkit.merging.api",
    "merge_variants": "soupkit.merging.api",
    "MergePlan": "soupkit.merging.plan",
    "plan_merge": "soupkit.merging.plan",
    "WRITERS": "soupkit.merging.writers",
    "Writer": "soupkit.merging.writers",
    "uniform_soup": "soupkit.merging.api",
    "wise_ft": "soupkit.merging.api",
    "wise_output_name": "soupkit.merging.api",
    "MergeMethod": "soupkit.merging.registry",
    "MethodParams": "soupkit.merging.registry",
    "Param": "soupkit.merging.registry",
    "TensorFiles": "soupkit.merging.registry",
    "get_method": "soupkit.merging.registry",
    "list_methods": "soupkit.merging.registry",
    "merge_method": "soupkit.merging.registry",
    "OutputOptions": "soupkit.options",
    "SoupkitWarning": "soupkit.merging.engine",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

if TYPE_CHECKING:  # pragma: no cover
    from soupkit.merging.api import merge, merge_variants, uniform_soup, wise_ft, wise_output_name
    from soupkit.merging.engine import SoupkitWarning
    from soupkit.merging.plan import MergePlan, plan_merge
    from soupkit.merging.registry import (
        MergeMethod,
        MethodParams,
        Param,
        TensorFiles,
        get_method,
        list_methods,
        merge_method,
    )
    from soupkit.merging.writers import WRITERS, Writer
    from soupkit.options import OutputOptions
