"""Pieces shared by the upcycling recipes: the router's direction matrix, building an MoE layer from
dense SwiGLU weights, Drop-Upcycling re-initialisation, and persisting per-layer MoE configs.

Shape legend: E experts, D model dim, F expert hidden size.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig
from moelab.models.moe_protocol import moe_layers


def router_matrix(router: nn.Module, num_experts: int, d_model: int) -> nn.Parameter:
    """The router's single ``(E, D)`` parameter (its gate); raises when it has none or several."""
    found = [p for p in router.parameters() if tuple(p.shape) == (num_experts, d_model)]
    if len(found) != 1:
        raise MoelabError(f"router {type(router).__name__} has {len(found)} parameters of shape "
                          f"({num_experts}, {d_model}); upcycling needs exactly one (a linear gate)")
    return found[0]


def check_preserving_router(cfg: MoEConfig, what: str) -> None:
    """Function preservation needs top-k weights that sum to 1: softmax_topk, renormalised (k > 1)."""
    if cfg.router != "softmax_topk":
        raise MoelabError(f"{what}: router={cfg.router!r} is not valid; choose one of: 'softmax_topk' "
                          "(its renormalised top-k weights make the upcycled layer equal the dense FFN)")


@torch.no_grad()
def drop_reinit_(w_gate_EFD: Tensor, w_up_EFD: Tensor, w_down_EDF: Tensor, ratio: float,
                 generator: torch.Generator | None) -> None:
    """Drop-Upcycling (Nakamura et al. 2025, "Drop-Upcycling: Training Sparse Mixture of Experts with
    Partial Re-initialization"): for each expert independently, pick ``ratio * F`` hidden units at random
    and re-draw their gate/up rows and down columns from N(mean, std) of the original matrix."""
    check_range("drop_ratio", ratio, low=0.0, high=1.0)
    E, Fh, _ = w_up_EFD.shape
    n = int(round(ratio * Fh))
    if n == 0:
        return
    in_stats = [(w, float(w[0].mean()), float(w[0].std())) for w in (w_gate_EFD, w_up_EFD)]
    down_stats = (float(w_down_EDF[0].mean()), float(w_down_EDF[0].std()))
    for e in range(E):
        idx_N = torch.randperm(Fh, generator=generator)[:n]
        for w, mean, std in in_stats:
            w[e, idx_N, :] = (torch.randn((n, w.shape[2]), generator=generator) * std + mean).to(w)
        mean, std = down_stats
        w_down_EDF[e][:, idx_N] = (torch.randn((w_down_EDF.shape[1], n), generator=generator) * std + mean).to(w_down_EDF)


def persist_model_config(model_cfg: ModelConfig, model: nn.Module) -> ModelConfig:
    """A copy of ``model_cfg`` describing ``model``'s MoE blocks: ``moe_layers`` = their indices,
    ``moe`` = the first block's config, ``layer_overrides`` = every other block's differing fields
    (docs/INTERFACES.md, "MoE-layer protocol"). The vanilla layout only."""
    if not model_cfg.layout.is_vanilla():
        raise MoelabError("upcycling needs the vanilla layout (model.layout.kind='per_layer')")
    sites = moe_layers(model)
    if not sites:
        return replace(model_cfg, moe_layers="none", layer_overrides={}, first_k_dense=0)
    base = replace(sites[0].layer.cfg, d_model=model_cfg.d_model)
    names = [f.name for f in fields(MoEConfig) if f.name != "d_model"]
    overrides = {}
    for s in sites[1:]:
        diff = {n: getattr(s.layer.cfg, n) for n in names if getattr(s.layer.cfg, n) != getattr(base, n)}
        if diff:
            overrides[str(s.index)] = diff
    out = replace(model_cfg, moe=base, moe_layers=[s.index for s in sites], layer_overrides=overrides,
                  first_k_dense=0)
    return out.validate()
