"""Lazy package exports (PEP 562), so that importing a config schema does not import torch or transformers.

Why: `qat_lightning.config` imports each package's `config` module to check a command line, and Python runs
the package's `__init__` first; eager re-exports there made a bad command line take ~19 s to refuse.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """`(__all__, __getattr__)` for `package`, whose name `n` comes from its submodule `exports[n]` on first use.

    No exported name may also be a submodule's name: once that submodule is imported, the import system binds
    the module on the package and the lazy lookup is never asked (tests/test_trunk.py checks every package).
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return sorted(exports), __getattr__
