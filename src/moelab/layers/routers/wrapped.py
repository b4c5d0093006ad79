"""A router that wraps a base router: maps its experts onto merged experts and skips low-importance slots.

Shape legend: T tokens, D model dim, E experts of this layer, B experts of the base router, S slots.

Used by ``moelab.ops`` (prune / merge / skip a trained model) and persisted in the run's config as
``ModelConfig.layer_overrides[block] = {"router": "wrapped", "router_kwargs": {...}}``, so an operated
model is an ordinary run directory. The base router's weights live at ``router.base.*``.

- ``expert_map`` (list of B ints): base expert b is served by layer expert ``expert_map[b]``.
  Expert merging (M-SMoE / MC-SMoE, HC-SMoE, Sub-MoE) keeps the original router and lets every
  member of a merged group route to the merged expert, as the official MC-SMoE and HC-SMoE code do
  (they put the merged module in every member's slot). A token that picks two members of one group
  uses the merged expert once per pick, i.e. with the sum of their gates. ``probs_TE`` of the result
  are the base probabilities summed per merged expert (``logits_TE`` their log-sum-exp), so balance
  losses and stats see E experts.
- ``skip_threshold`` / ``skip_scale`` (MoDES, Huang et al. 2025, "globally-modulated local gating"):
  a slot is skipped (``keep_S`` False, the dispatcher ignores it) when
  ``skip_scale * importance < skip_threshold``, importance = the base router's probability of that
  expert for the token (``probs_TE``; the combine weight when the router has none). The remaining
  weights are not renormalised (the skipped expert's contribution is removed). Threshold 0 is the
  identity. ``skip_scale`` is MoDES's calibrated per-layer global importance (1 for the plain
  gate-threshold baseline).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers.base import ROUTERS, Router, build_router
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "wrapped",
    description="wraps a base router: merged-expert map and MoDES / gate-threshold expert skipping",
    paper="Li et al. 2024 (MC-SMoE); Chen et al. 2025 (HC-SMoE); Huang et al. 2025 (MoDES)",
)
class WrappedRouter(Router):
    """Base router -> map experts (``expert_map``) -> drop slots under the skip threshold."""

    def __init__(self, cfg: MoEConfig, *, base: str = "softmax_topk", base_kwargs: dict | None = None,
                 base_experts: int | None = None, expert_map: list[int] | None = None,
                 skip_threshold: float = 0.0, skip_scale: float = 1.0) -> None:
        super().__init__(replace(cfg, aux_free_bias=False))
        B = cfg.num_experts if base_experts is None else int(base_experts)
        check_range("base_experts", B, low=1)
        check_range("skip_threshold", skip_threshold, low=0.0)
        check_range("skip_scale", skip_scale, low=0.0, low_inclusive=False)
        self.base = build_router(replace(cfg, num_experts=B, router=base, router_kwargs=dict(base_kwargs or {}),
                                         k=min(cfg.k, B)))
        if getattr(self.base, "forward_layer", None) is not None:
            raise MoelabError(f"router 'wrapped' cannot wrap base={base!r}: it computes the layer output itself")
        self.register_buffer("expert_map_B", self._check_map(expert_map, B, cfg.num_experts), persistent=False)
        self.skip_threshold, self.skip_scale = float(skip_threshold), float(skip_scale)

    @staticmethod
    def _check_map(expert_map: list[int] | None, B: int, E: int) -> Tensor | None:
        if expert_map is None:
            if B != E:
                raise MoelabError(f"base_experts={B} differs from num_experts={E}; pass an expert_map")
            return None
        m = torch.as_tensor(list(expert_map), dtype=torch.long)
        if m.numel() != B or (m < 0).any() or (m >= E).any():
            raise MoelabError(f"expert_map={list(expert_map)!r} must have base_experts={B} entries in [0, {E})")
        return m

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        r = self.base(x_TD, ctx)
        if self.expert_map_B is not None:
            r = self._map(r)
        if self.skip_threshold > 0:
            r = self._skip(r)
        return r

    def _map(self, r: RoutingResult) -> RoutingResult:
        m_B = self.expert_map_B.to(r.expert_S.device)
        E = self.num_experts
        kw: dict[str, Any] = {}
        if r.probs_TE is not None:
            p_TE = r.probs_TE.new_zeros(r.num_tokens, E).index_add_(1, m_B, r.probs_TE)
            kw["probs_TE"] = p_TE
            kw["logits_TE"] = p_TE.clamp_min(1e-30).log()
        return replace(r, expert_S=m_B[r.expert_S], num_experts=E, selection_bias_E=None, **kw)

    def _skip(self, r: RoutingResult) -> RoutingResult:
        imp_S = r.weight_S if r.probs_TE is None else r.probs_TE[r.token_S, r.expert_S]
        keep_S = (self.skip_scale * imp_S.detach()) >= self.skip_threshold
        if r.keep_S is not None:
            keep_S = keep_S & r.keep_S
        return replace(r, keep_S=keep_S)
