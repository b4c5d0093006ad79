"""Routing after training (issue 17, parts 1-2): re-route at test time and steer, on any model with
MoE layers (:mod:`moelab.models.moe_protocol`), through router-logit offsets (:mod:`.offsets`).

Methods (one file each, registered in :data:`REROUTE_METHODS`): ``r2t2`` (R2-T2), ``c3po`` (C3PO),
``rewire`` (Rewiring Experts on the Fly), ``steer`` (routing steering). :func:`moelab.ops.reroute.evaluate.compare_methods`
scores each against the unmodified model on held-out continuations.
"""

from __future__ import annotations

import importlib
import pkgutil

from moelab.ops.reroute.base import REROUTE_METHODS, Adaptation  # noqa: F401

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name not in ("base", "offsets", "samples", "evaluate"):
        importlib.import_module(f"{__name__}.{_m.name}")
