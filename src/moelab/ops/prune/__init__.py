"""Expert pruning criteria (one file each) behind ``PRUNE_CRITERIA``; see :mod:`moelab.ops.prune.base`."""

from __future__ import annotations

import importlib
import pkgutil

from moelab.ops.prune.base import (
    PRUNE_CRITERIA, PruneConfig, check_keep, n_keep, plan_pruning, prune_model, score_layers, top_experts,
)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["PRUNE_CRITERIA", "PruneConfig", "check_keep", "n_keep", "plan_pruning", "prune_model",
           "score_layers", "top_experts"]
