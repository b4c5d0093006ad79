"""Expert merging: the method registry, shared pieces (neuron alignment, weighted averaging) and the
surgery.

A method is ``fn(layer, stats, n_out, **opts) -> (expert_map, weights[, info])``: ``expert_map[e]`` is the
merged expert that original expert e becomes (values 0..n_out-1) and ``weights`` the merged experts'
stacked weights (``w_up_EFD``, ``w_down_EDF``, ``w_gate_EFD``); ``info`` (optional) goes into the
layer's manifest entry (MC-SMoE: ``stored_expert_params``, the size of its factored experts).
:func:`merge_model` installs them with :func:`moelab.ops.apply.merged_layer`: the original router is
kept and every member of a group routes to its merged expert (the official MC-SMoE / HC-SMoE code
shares one merged module among the group's slots). DERN (``drops_experts``) returns the kept experts
instead of a map, and its layers lose the dropped router rows as in pruning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice
from moelab.models.moe_protocol import require_moe
from moelab.ops.apply import expert_weights, merged_layer, pruned_layer, replace_layers
from moelab.ops.calibrate import LayerStats
from moelab.ops.prune.base import check_keep, n_keep
from moelab.registry import Registry

MERGE_METHODS: Registry[Callable[..., tuple[list[int], dict[str, Tensor]]]] = Registry("merging method")


@dataclass(kw_only=True)
class MergeConfig:
    """``method`` (a ``MERGE_METHODS`` name), ``keep`` (fraction in (0, 1] or a count of merged experts
    per layer), ``options`` passed to the method (e.g. ``{"rank": 16}`` for sub_moe)."""

    method: str = "hc_smoe"
    keep: float | int = 0.5
    options: dict[str, Any] | None = None

    def validate(self) -> "MergeConfig":
        check_choice("method", self.method, MERGE_METHODS.names())
        check_keep(self.keep)
        return self


# --------------------------------------------------------------------------- shared pieces
def neuron_features(w: dict[str, Tensor], e: int) -> Tensor:
    """``[F, *]``: each hidden neuron's weights of expert e (gate row, up row, down column)."""
    parts = [w["w_up_EFD"][e], w["w_down_EDF"][e].T]
    if "w_gate_EFD" in w:
        parts.insert(0, w["w_gate_EFD"][e])
    return torch.cat(parts, dim=1)


def align_permutation(w: dict[str, Tensor], ref: int, e: int) -> Tensor:
    """Weight matching (Ainsworth et al. 2023, used by M-SMoE / MC-SMoE): the permutation ``perm_F`` of
    expert e's hidden neurons maximising sum_f <feat_ref[f], feat_e[perm[f]]> (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    a, b = neuron_features(w, ref), neuron_features(w, e)
    _, cols = linear_sum_assignment(-(a @ b.T).numpy())
    return torch.as_tensor(cols, dtype=torch.long)


def permute_expert(w: dict[str, Tensor], e: int, perm_F: Tensor) -> dict[str, Tensor]:
    """Expert e's weights with hidden neurons reordered by ``perm_F`` (the function is unchanged)."""
    out = {"w_up_EFD": w["w_up_EFD"][e][perm_F], "w_down_EDF": w["w_down_EDF"][e][:, perm_F]}
    if "w_gate_EFD" in w:
        out["w_gate_EFD"] = w["w_gate_EFD"][e][perm_F]
    return out


def one_expert(w: dict[str, Tensor], e: int) -> dict[str, Tensor]:
    return {n: t[e] for n, t in w.items()}


def weighted_average(experts: list[dict[str, Tensor]], weights: np.ndarray) -> dict[str, Tensor]:
    """``sum_i a_i W_i / sum_i a_i`` per weight (uniform when all ``weights`` are 0)."""
    a = np.asarray(weights, dtype=np.float64)
    a = np.ones_like(a) if a.sum() <= 0 else a
    a = a / a.sum()
    return {n: sum(float(ai) * ex[n] for ai, ex in zip(a, experts)) for n in experts[0]}


def stack(merged: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {n: torch.stack([m[n] for m in merged]) for n in merged[0]}


def groups_of(expert_map: list[int]) -> list[list[int]]:
    n = max(expert_map) + 1
    return [[e for e, g in enumerate(expert_map) if g == j] for j in range(n)]


def renumber(labels: list[int]) -> list[int]:
    """Cluster labels -> 0..n-1 in order of each cluster's smallest expert."""
    order = {}
    for lab in labels:
        order.setdefault(lab, len(order))
    return [order[lab] for lab in labels]


# --------------------------------------------------------------------------- the model
def merge_model(model: nn.Module, stats: dict[int, LayerStats], cfg: MergeConfig) -> dict[str, Any]:
    """Merge every MoE layer of ``model`` in place; returns the manifest (groups per block)."""
    cfg.validate()
    fn = MERGE_METHODS.get(cfg.method)
    new, manifest = {}, {}
    for site in require_moe(model, "merging"):
        if site.index not in stats:
            raise MoelabError(f"calibration stats lack MoE block {site.index}; calibrate this model")
        E = site.layer.cfg.num_experts
        n_out = n_keep(cfg.keep, E, site.index)
        if n_out < site.layer.cfg.k:
            raise MoelabError(f"merging block {site.index} to {n_out} experts is fewer than its k={site.layer.cfg.k}")
        if n_out == E:
            manifest[str(site.index)] = {"groups": [[e] for e in range(E)]}
            continue
        emap, weights, *info = fn(site.layer, stats[site.index], n_out, **(cfg.options or {}))
        if getattr(fn, "drops_experts", False):  # DERN: emap is the kept list; router rows removed
            new[site.index] = _with_weights(pruned_layer(site.layer, emap, block=site.index), weights)
            manifest[str(site.index)] = {"kept": emap, "removed": sorted(set(range(E)) - set(emap))}
            continue
        new[site.index] = merged_layer(site.layer, emap, weights)
        manifest[str(site.index)] = {"groups": groups_of(emap), "expert_map": emap, **(info[0] if info else {})}
    replace_layers(model, new)
    return {"op": "merge", "method": cfg.method, "paper": MERGE_METHODS.entry(cfg.method).paper,
            "keep": cfg.keep, "options": cfg.options or {}, "layers": manifest}


def _with_weights(layer: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    with torch.no_grad():
        for name, w in weights.items():
            getattr(layer.experts, name).copy_(w)
    return layer


def layer_weights(layer: nn.Module) -> dict[str, Tensor]:
    return expert_weights(layer)
