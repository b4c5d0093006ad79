"""Expert pruning: the criterion registry, the budget, and the surgery.

A criterion is ``fn(stats: LayerStats, **opts) -> score_E`` (higher = keep), registered in
``PRUNE_CRITERIA`` from its own file. :func:`plan_pruning` turns scores into the experts each layer
keeps (per-layer or global budget, group-aware, super-expert guard); :func:`prune_model` applies
the plan through the MoE-layer protocol (router rows removed, k unchanged unless ``cap_k``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch import nn

from moelab.errors import MoelabError, check_choice
from moelab.models.moe_protocol import require_moe
from moelab.ops.apply import check_k, pruned_layer, replace_layers
from moelab.ops.calibrate import LayerStats
from moelab.registry import Registry

PRUNE_CRITERIA: Registry[Callable[..., np.ndarray]] = Registry("pruning criterion")
SCOPES = ("layer", "global")


@dataclass(kw_only=True)
class PruneConfig:
    """``criterion`` (a ``PRUNE_CRITERIA`` name); ``keep``: a fraction in (0, 1] (float) or an expert
    count per layer (int); ``scope`` "layer" (each layer keeps its share) or "global" (one ranking of
    per-layer-normalised scores over all layers, each layer keeping at least k); ``renormalize``
    sets the router's ``renormalize`` kwarg on the pruned layers (None: unchanged); ``guard_super_experts``
    always keeps the Super Experts; ``cap_k`` lowers k where fewer than k experts remain;
    ``task``: the domain whose tokens TCESS scores (None: all)."""

    criterion: str = "reap"
    keep: float | int = 0.5
    scope: str = "layer"
    renormalize: bool | None = None
    guard_super_experts: bool = False
    cap_k: bool = False
    task: str | None = None

    def validate(self) -> "PruneConfig":
        check_choice("criterion", self.criterion, PRUNE_CRITERIA.names())
        check_choice("scope", self.scope, SCOPES)
        check_keep(self.keep)
        return self


def check_keep(keep: float | int) -> None:
    """``keep`` must be a fraction in (0, 1] (a float) or an expert count >= 1 (an int)."""
    ok = not isinstance(keep, bool) and (
        (isinstance(keep, float) and 0.0 < keep <= 1.0) or (isinstance(keep, int) and keep >= 1))
    if not ok:
        raise MoelabError(f"keep={keep!r} is not valid; choose a fraction in (0, 1] (e.g. 0.5) or an expert "
                          "count >= 1 (e.g. 4)")


def n_keep(keep: float | int, E: int, block: int) -> int:
    """Experts a layer of ``E`` keeps: ``round(keep * E)`` (at least 1) or the count ``keep``."""
    if isinstance(keep, float):
        return max(1, int(round(keep * E)))
    if keep > E:
        raise MoelabError(f"keep={keep} is out of range for block {block}, which has {E} experts; choose 1..{E}")
    return int(keep)


def _groups(layer: nn.Module) -> int:
    return int(layer.cfg.router_kwargs.get("n_groups", 1) or 1)


def top_experts(score_E: np.ndarray, n: int, n_groups: int = 1) -> list[int]:
    """The ``n`` best experts (ties: lower index first); with ``n_groups`` > 1 the same number from
    each contiguous group, so a group-limited router keeps equal groups."""
    E = len(score_E)
    if n_groups <= 1:
        return sorted(np.argsort(-score_E, kind="stable")[:n].tolist())
    if n % n_groups:
        raise MoelabError(f"keeping {n} experts does not split into n_groups={n_groups} equal groups; "
                          f"choose a multiple of {n_groups}")
    per, size = n // n_groups, E // n_groups
    out = []
    for g in range(n_groups):
        out += [g * size + i for i in top_experts(score_E[g * size:(g + 1) * size], per)]
    return sorted(out)


def _global_plan(scores: dict[int, np.ndarray], totals: dict[int, int], floors: dict[int, int]) -> dict[int, list[int]]:
    """One ranking over layers of scores normalised to sum 1 per layer (so layers compare), each layer
    keeping at least ``floors[block]`` experts; ``sum(totals)`` experts in all."""
    keep = {b: set(top_experts(s, floors[b])) for b, s in scores.items()}
    rest = sorted(((-s[e] / max(s.sum(), 1e-300), b, e) for b, s in scores.items() for e in range(len(s))
                   if e not in keep[b] and np.isfinite(s[e])), key=lambda t: (t[0], t[1], t[2]))
    budget = sum(totals.values()) - sum(len(v) for v in keep.values())
    for _, b, e in rest[:max(budget, 0)]:
        keep[b].add(e)
    return {b: sorted(v) for b, v in keep.items()}


def score_layers(stats: dict[int, LayerStats], cfg: PruneConfig,
                 domains: list[str] | None = None) -> dict[int, np.ndarray]:
    """Each layer's criterion scores, super experts set to +inf when guarded."""
    opts: dict[str, Any] = {}
    if cfg.task is not None:
        doms = list(domains or [])
        check_choice("task", cfg.task, doms)
        opts["task"] = doms.index(cfg.task)
    fn = PRUNE_CRITERIA.get(cfg.criterion)
    scores = {b: np.asarray(fn(st, **opts), dtype=np.float64) for b, st in stats.items()}
    if cfg.guard_super_experts:
        from moelab.ops.prune.super_experts import super_experts

        for b, es in super_experts(stats).items():
            scores[b][list(es)] = np.inf
    return scores


def plan_pruning(model: nn.Module, stats: dict[int, LayerStats], cfg: PruneConfig,
                 domains: list[str] | None = None) -> dict[int, list[int]]:
    """``{block: experts kept}`` for ``model`` from calibration ``stats`` (see :class:`PruneConfig`)."""
    cfg.validate()
    sites = {s.index: s.layer for s in require_moe(model, "pruning")}
    missing = sorted(set(sites) - set(stats))
    if missing:
        raise MoelabError(f"calibration stats lack MoE blocks {missing}; calibrate this model")
    scores = score_layers({b: stats[b] for b in sites}, cfg, domains)
    totals = {b: n_keep(cfg.keep, l.cfg.num_experts, b) for b, l in sites.items()}
    if cfg.scope == "layer":
        return {b: top_experts(scores[b], totals[b], _groups(sites[b])) for b in sites}
    if any(_groups(l) > 1 for l in sites.values()):
        raise MoelabError("scope='global' is not supported for group-limited routers (n_groups > 1); use scope='layer'")
    floors = {b: min(l.cfg.num_experts, 1 if cfg.cap_k else l.cfg.k) for b, l in sites.items()}
    return _global_plan(scores, totals, floors)


def prune_model(model: nn.Module, plan: dict[int, list[int]], cfg: PruneConfig) -> dict[str, Any]:
    """Apply ``plan`` in place; returns the manifest (kept and removed experts per block)."""
    sites = {s.index: s.layer for s in require_moe(model, "pruning")}
    new, manifest = {}, {}
    for b, keep in plan.items():
        layer = sites[b]
        kw = None
        if cfg.renormalize is not None:
            kw = {**layer.cfg.router_kwargs, "renormalize": bool(cfg.renormalize)}
        check_k(layer.cfg.k, len(keep), b, cfg.cap_k)
        if len(keep) < layer.cfg.num_experts or kw is not None:
            new[b] = pruned_layer(layer, keep, block=b, cap_k=cfg.cap_k, router_kwargs=kw)
        manifest[str(b)] = {"kept": list(keep), "removed": sorted(set(range(layer.cfg.num_experts)) - set(keep))}
    replace_layers(model, new)
    return {"op": "prune", "criterion": cfg.criterion, "paper": PRUNE_CRITERIA.entry(cfg.criterion).paper,
            "keep": cfg.keep, "scope": cfg.scope, "renormalize": cfg.renormalize,
            "guard_super_experts": cfg.guard_super_experts, "task": cfg.task, "layers": manifest}
