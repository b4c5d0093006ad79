"""DeepSeek-V3 sigmoid top-k router with optional group-limited (node-limited) routing.

Shape legend: T tokens, D model dim, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers.base import (
    ROUTERS, GateLinear, Router, check_finite_logits, group_limited_mask, select_topk,
)
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "sigmoid_topk",
    description="sigmoid affinities, top-k on scores+bias, normalised weights, group-limited option (DeepSeek-V3)",
    paper="DeepSeek-AI 2024, DeepSeek-V3 Technical Report (arXiv 2412.19437)",
)
class SigmoidTopKRouter(Router):
    """DeepSeek-V3 routing (report sections 2.1.1-2.1.2).

    ``s_t = sigmoid(x_t W)``; experts are chosen by top-k of ``s_t + b`` (b: aux-free bias, used for
    selection only); weights ``g = s_sel / sum(s_sel) * route_scale`` (``renormalize=False`` keeps the
    raw sigmoid scores). Group-limited routing (``n_groups`` > 1): the E experts form ``n_groups``
    contiguous groups; each token keeps the ``topk_groups`` groups with the largest sum of their top-2
    biased scores and chooses its top-k experts inside them (the V3 inference code scores groups on
    ``s + b`` too). ``probs_TE`` are the sigmoid scores; balance losses normalise them per token
    as V3's sequence-wise loss does.
    """

    def __init__(self, cfg: MoEConfig, *, n_groups: int = 1, topk_groups: int | None = None,
                 route_scale: float = 1.0, renormalize: bool = True) -> None:
        super().__init__(cfg)
        E = cfg.num_experts
        check_range("n_groups", n_groups, low=1, high=E)
        if E % n_groups:
            raise MoelabError(f"n_groups={n_groups!r} must divide num_experts={E}")
        topk_groups = n_groups if topk_groups is None else topk_groups
        check_range("topk_groups", topk_groups, low=1, high=n_groups)
        if cfg.k > topk_groups * (E // n_groups):
            raise MoelabError(
                f"k={cfg.k} is larger than the experts in topk_groups={topk_groups} groups of {E // n_groups}; "
                f"expected k <= {topk_groups * (E // n_groups)}"
            )
        check_range("route_scale", route_scale, low=0.0, low_inclusive=False)
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.route_scale, self.renormalize = float(route_scale), bool(renormalize)
        self.gate = GateLinear(cfg.d_model, E, cfg.init_std)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        logits_TE = check_finite_logits(self.gate(x_TD), "sigmoid_topk")
        scores_TE = torch.sigmoid(logits_TE)
        bias_E = self.selection_bias()
        allowed_TE = None
        if self.topk_groups < self.n_groups:
            biased_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E
            allowed_TE = group_limited_mask(biased_TE, self.n_groups, self.topk_groups)
        idx_TK = select_topk(scores_TE, self.k, bias_E, allowed_TE)
        w_TK = scores_TE.gather(1, idx_TK)
        if self.renormalize:
            w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
        w_TK = w_TK * self.route_scale
        return RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=logits_TE, probs_TE=scores_TE)
