"""Upcycling recipes: dense -> MoE (sparse, granular, carve, dume) and growing an MoE (grow).

One file per method, each registered in ``UPCYCLERS`` (``fn(model, cfg, **kw) -> model``, in place)
with its typed options in ``UPCYCLE_CONFIGS``; every module of this folder is imported here. Recipes
use only the MoE-layer protocol and the dense-FFN seam (:mod:`moelab.ops.upcycle.dense`), so they
apply to any model with moelab ``DenseFFN``/HF-style MLPs or ``MoELayer`` blocks. Run directories:
:mod:`moelab.ops.upcycle.runs` (``upcycle_run``).
"""

from __future__ import annotations

import importlib
import pkgutil

from moelab.ops.upcycle.registry import UPCYCLE_CONFIGS, UPCYCLERS

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_") and _m.name not in ("registry",):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["UPCYCLERS", "UPCYCLE_CONFIGS"]
