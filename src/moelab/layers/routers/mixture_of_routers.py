"""Mixture of Routers (MoR): several sub-routers decide jointly, weighted by a learnable main router.

Zhang et al. 2025, "Mixture of Routers" (arXiv:2503.23362). Motivated by redundancy and fault
tolerance, the single router of an MoE layer is replaced by an MoE *of routers*: ``R`` sub-routers
each score the experts, and a learnable main router produces the weights of the sub-routers for
the token, so the final expert scores are

    g(x) = sum_j a_j(x) softmax(W_j x),        a(x) = softmax(W_main x)   (over R sub-routers),

followed by top-k expert selection on ``g``. The main router is itself sparse when
``router_top`` < R: only its top ``router_top`` sub-routers are used (their ``a_j`` renormalised),
like an MoE's top-k.

Choices (the paper's formulas were not available beyond its abstract; recorded): sub-router
scores are softmax probabilities (so ``g`` is a distribution over experts); the expert weights
are the selected entries of ``g`` renormalised when k > 1; defaults ``n_routers=4``,
``router_top=n_routers`` (all sub-routers, dense main router). ``probs_TE = g`` (balance losses
act on the mixed distribution). The paper applies MoR to LoRA experts in fine-tuning; here it
routes moelab's ordinary experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.errors import check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "mixture_of_routers",
    description="MoR: R sub-routers' expert distributions mixed by a learnable main router, then top-k",
    paper="Zhang et al. 2025, Mixture of Routers (arXiv:2503.23362)",
)
class MixtureOfRoutersRouter(Router):
    causal = True

    def __init__(self, cfg: MoEConfig, *, n_routers: int = 4, router_top: int | None = None) -> None:
        super().__init__(cfg)
        self.n_routers = int(check_range("router_kwargs.n_routers", n_routers, low=1))
        top = self.n_routers if router_top is None else router_top
        self.router_top = int(check_range("router_kwargs.router_top", top, low=1, high=self.n_routers))
        self.sub = nn.ModuleList(GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std) for _ in range(self.n_routers))
        self.main = GateLinear(cfg.d_model, self.n_routers, cfg.init_std)

    def mixed_probs(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """``(g_TE, a_TR)``: the mixed expert distribution and the sub-router weights."""
        a_TR = torch.softmax(check_finite_logits(self.main(x_TD), "mixture_of_routers"), dim=-1)
        if self.router_top < self.n_routers:
            top = torch.topk(a_TR.detach(), self.router_top, dim=-1).indices
            mask = torch.zeros_like(a_TR, dtype=torch.bool).scatter_(1, top, True)
            a_TR = a_TR * mask
            a_TR = a_TR / a_TR.sum(-1, keepdim=True)
        p_TRE = torch.stack([torch.softmax(check_finite_logits(r(x_TD), "mixture_of_routers"), dim=-1)
                             for r in self.sub], dim=1)
        return (a_TR[:, :, None] * p_TRE).sum(1), a_TR

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        g_TE, _ = self.mixed_probs(x_TD)
        bias_E = self.selection_bias()
        with torch.no_grad():
            sel = g_TE.detach() if bias_E is None else g_TE.detach() + bias_E
            idx_TK = torch.topk(sel, self.k, dim=-1).indices
        w_TK = g_TE.gather(1, idx_TK)
        if self.k > 1:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=torch.log(g_TE.clamp_min(1e-30)),
                                       probs_TE=g_TE)
