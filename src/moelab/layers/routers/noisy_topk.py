"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks", section 2.1, appendix A).

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.errors import check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits, select_topk
from moelab.layers.routing import RoutingContext, RoutingResult


def cv_squared(x_E: Tensor) -> Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (population variance)."""
    x_E = x_E.float()
    return x_E.var(unbiased=False) / (x_E.mean().square() + 1e-10)


@ROUTERS.register(
    "noisy_topk",
    description="tunable Gaussian noise on the gate logits in training, keep top-k, softmax (sparsely-gated MoE)",
    paper="Shazeer et al. 2017, Outrageously Large Neural Networks (arXiv 1701.06538)",
)
class NoisyTopKRouter(Router):
    """``H(x) = x W_g + N(0,1) * softplus(x W_noise)`` (noise in training only), ``G = softmax(KeepTopK(H, k))``.

    Following the paper, ``W_g`` and ``W_noise`` start at zero (``zero_init``), so early routing is
    driven by the noise. The paper's own balance losses (appendix A) are optional router-owned
    losses in ``routing.aux_losses`` (already multiplied by their coefficient), computed over real
    tokens of the micro-batch:
    ``importance = importance_coef * CV(sum_x G(x))^2`` and, in training only,
    ``load = load_coef * CV(sum_x P(x, i))^2`` with the smooth load estimator
    ``P(x, i) = Phi((x W_g)_i - kth_excluding(H(x), k, i)) / softplus((x W_noise)_i))``.
    Both default to 0: the Switch loss (``cfg.aux_loss``) also works. ``logits_TE`` is H (noisy in
    training) and ``probs_TE = softmax(H)`` over all experts (what the Switch loss uses).
    """

    def __init__(self, cfg: MoEConfig, *, zero_init: bool = True, importance_coef: float = 0.0,
                 load_coef: float = 0.0) -> None:
        super().__init__(cfg)
        check_range("importance_coef", importance_coef, low=0.0)
        check_range("load_coef", load_coef, low=0.0)
        std = 0.0 if zero_init else cfg.init_std
        self.gate = GateLinear(cfg.d_model, cfg.num_experts, std)
        self.noise_gate = GateLinear(cfg.d_model, cfg.num_experts, std)
        self.importance_coef, self.load_coef = float(importance_coef), float(load_coef)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        clean_TE = check_finite_logits(self.gate(x_TD), "noisy_topk")
        noisy = self.training
        if noisy:
            noise_std_TE = F.softplus(self.noise_gate(x_TD))
            logits_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
            logits_TE = check_finite_logits(logits_TE, "noisy_topk")
        else:
            logits_TE = clean_TE
        idx_TK = select_topk(logits_TE, self.k, self.selection_bias())
        w_TK = torch.softmax(logits_TE.gather(1, idx_TK), dim=-1)
        routing = RoutingResult.from_topk(
            idx_TK, w_TK, self.num_experts, logits_TE=logits_TE, probs_TE=torch.softmax(logits_TE, dim=-1)
        )
        valid_T = None if ctx is None or ctx.valid_T is None else ctx.valid_T.reshape(-1).bool()
        m_T = torch.ones(x_TD.shape[0], 1, device=x_TD.device) if valid_T is None else valid_T[:, None].float()
        if self.importance_coef > 0:
            importance_E = (routing.dense_TE() * m_T).sum(0)
            routing.aux_losses["importance"] = self.importance_coef * cv_squared(importance_E)
        if self.load_coef > 0 and noisy and self.k < self.num_experts:
            # kth_excluding(H, k, i): the (k+1)-th largest of H if i is among the top-k, else the k-th.
            top_TK1 = logits_TE.topk(self.k + 1, dim=-1).values
            in_topk_TE = logits_TE >= top_TK1[:, self.k - 1 : self.k]
            thresh_TE = torch.where(in_topk_TE, top_TK1[:, self.k : self.k + 1], top_TK1[:, self.k - 1 : self.k])
            z_TE = (clean_TE - thresh_TE) / (noise_std_TE + 1e-9)
            p_TE = 0.5 * (1 + torch.erf(z_TE / math.sqrt(2.0)))  # standard normal CDF
            routing.aux_losses["load"] = self.load_coef * cv_squared((p_TE * m_T).sum(0))
        return routing
