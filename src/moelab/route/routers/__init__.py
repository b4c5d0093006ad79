"""Model-level routers, one file per router, registered in ``MODEL_ROUTERS`` by name (see
:mod:`moelab.route.base` for the interface).

Every module in this folder not starting with ``_`` is imported here, so adding a router is
adding one file. The router classes stay importable from ``moelab.route.routers``.

Shapes: P prompts routed, N training prompts, M models, D feature dim, H hidden dim,
K clusters or neighbours.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from moelab.route.base import MODEL_ROUTERS, ModelRouter

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


def router_info() -> list[dict]:
    """Name, description, paper, options (defaults) and the CV grid of every registered router."""
    return [{"name": e.name, "description": e.description, "paper": e.paper,
             "options": {f.name: f.default for f in dataclasses.fields(e.obj.Config)},
             "cv_grid": dict(getattr(e.obj, "cv_grid", {}) or {})}
            for e in MODEL_ROUTERS.entries()]


def __getattr__(name: str):
    """``moelab.route.routers.KNNRouter`` etc.: any registered router class by its class name."""
    for e in MODEL_ROUTERS.entries():
        if e.obj.__name__ == name:
            return e.obj
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODEL_ROUTERS", "ModelRouter", "router_info"]
