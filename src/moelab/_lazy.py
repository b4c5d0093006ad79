"""Lazy package attributes (PEP 562), so that ``import moelab`` and the CLI's ``--help`` stay light.

A package lists ``{public name: defining module}``; the module is imported on first access of the name
(``moelab.MoELayer`` or ``from moelab import MoELayer``), which then behaves exactly as an eager import.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], submodules: tuple[str, ...] = (),
                 module_globals: dict[str, Any] | None = None) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the module defining it;
    ``submodules`` are subpackages reachable as attributes (``moelab.layers``) without an explicit import;
    ``module_globals`` (the package's ``globals()``) adds its eager names to ``dir()``."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(submodules) | set(module_globals or ()))

    return __getattr__, __dir__
