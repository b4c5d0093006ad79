"""Routers: one file per router, registered in ``ROUTERS`` by name.

Every module in this folder is imported here, so adding a router is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from moelab.layers.routers.base import (
    ROUTERS,
    GateLinear,
    Router,
    build_router,
    check_finite_logits,
    group_limited_mask,
    router_kwarg_names,
    select_topk,
    validate_config,
)

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "ROUTERS",
    "GateLinear",
    "Router",
    "build_router",
    "check_finite_logits",
    "group_limited_mask",
    "router_kwarg_names",
    "select_topk",
    "validate_config",
]
