"""Null experts: zero-compute choices that let a token use fewer real experts (AdaMoE).

Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts
Language Models" (Findings of EMNLP 2024, arXiv:2406.13233; code: CengZihao/AdaMoE). The null
expert is also one of UniMoE-Audio's three expert types (2025, "UniMoE-Audio: Unified Speech and
Music Generation with Dynamic-Capacity MoE"), where it is chosen under Top-P routing.

The router scores ``E`` real plus ``m`` null experts (one linear gate to ``E + m``), takes a softmax
over all ``E + m`` and chooses top-``k'`` with a larger ``k'``. A null expert outputs zero and costs
nothing, so a token that picks ``j`` null experts uses ``k' - j`` real ones. Its null slots are not
emitted (``RoutingResult`` holds only real-expert slots; the realised number of experts per token
is therefore variable, possibly 0, in which case the layer adds nothing and the residual path
carries the token).

Weights (as AdaMoE's code): the selected *real* experts' softmax probabilities are renormalised
to sum to 1 among themselves; null experts contribute nothing.

Balancing (as AdaMoE): no per-token constraint on null usage; instead the Switch-style balance loss
is computed over all ``E + m`` experts, null experts included as ordinary experts, which keeps the
*average* null usage at its balanced share ``m / (E + m)`` of the ``k'`` slots while each token is
free to use more or fewer. The router owns this loss and it *replaces* the layer's balance loss
(``balance_losses`` is overridden; the router z-loss, if configured, is computed here over all
``E + m`` logits): ``aux_losses["aux_loss"] =
coef * (E + m) * sum_i f_i P_i`` (1.0 at perfect balance, moelab's convention), with ``f_i`` the
fraction of the choices that went to expert ``i`` and ``P_i`` the mean probability, over real
tokens of the micro-batch (whatever the ``aux_loss`` scope). ``coef`` is
``router_kwargs["balance_coef"]``, default ``cfg.aux_loss_coef`` (0 when ``aux_loss="none"``).
``probs_TE`` (stats) is the softmax restricted to the real experts, renormalised per token.

Defaults (documented choice): ``num_null = E`` and ``k' = 2 * cfg.k`` (at most ``E + m``). At a balanced load each of the
``2E`` choices gets ``k'/(2E)`` of the slots, so the average number of real experts per token is
``cfg.k``: the same mean compute as top-k, redistributed across tokens.
``selection="top_p"`` gives UniMoE-Audio's variant: top-p (threshold ``p``, cap ``k'``) over the
``E + m`` probabilities, then null slots removed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.errors import check_choice, check_range
from moelab.layers.balancing import z_loss
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo1_common import check_int, ctx_valid_or_none, valid_T
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routers.top_p import top_p_mask_TE
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "null_experts",
    description="top-k' over E real + m zero-compute null experts (token-adaptive number of real experts)",
    paper="Zeng et al. 2024, AdaMoE: Token-Adaptive Routing with Null Experts for MoE Language Models (arXiv:2406.13233)",
)
class NullExpertsRouter(Router):
    """router_kwargs: ``num_null`` (m, default E), ``k`` (k', default 2*cfg.k, at most E+m),
    ``selection`` ("topk" | "top_p"), ``p`` (for top_p, default 0.4), ``balance_coef``."""

    causal = True
    supports_aux_free = False  # AdaMoE balances real + null experts with its own loss

    def __init__(self, cfg: MoEConfig, *, num_null: int | None = None, k: int | None = None,
                 selection: str = "topk", p: float = 0.4, balance_coef: float | None = None) -> None:
        super().__init__(cfg)
        E = cfg.num_experts
        self.num_null = check_int("router_kwargs.num_null", E if num_null is None else num_null, 1)
        total = E + self.num_null
        self.k_total = check_int("router_kwargs.k", min(2 * cfg.k, total) if k is None else k, 1, total)
        self.selection = check_choice("router_kwargs.selection", selection, ("topk", "top_p"))
        self.p = float(check_range("router_kwargs.p", p, low=0.0, high=1.0, low_inclusive=False))
        if balance_coef is None:
            balance_coef = 0.0 if cfg.aux_loss == "none" else cfg.aux_loss_coef
        self.balance_coef = float(check_range("router_kwargs.balance_coef", balance_coef, low=0.0))
        self.gate = GateLinear(cfg.d_model, total, cfg.init_std)  # E real rows, then m null rows

    def balance_losses(self, routing: RoutingResult, ctx: RoutingContext | None = None) -> dict[str, Tensor]:
        """Nothing: the balance loss and the z-loss over all real + null logits are in
        ``routing.aux_losses`` (the layer's versions would only see the real experts)."""
        return {}

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        T, E = x_TD.shape[0], self.num_experts
        N = E + self.num_null
        logits_TN = check_finite_logits(self.gate(x_TD), "null_experts")
        probs_TN = logits_TN.softmax(-1)
        if self.selection == "topk":
            idx_TK = probs_TN.detach().topk(self.k_total, dim=-1).indices
            chosen_TN = torch.zeros(T, N, dtype=torch.bool, device=x_TD.device).scatter(-1, idx_TK, True)
        else:
            chosen_TN = top_p_mask_TE(probs_TN.detach(), self.p, self.k_total)

        real_TE = chosen_TN[:, :E]
        real_probs_TE = probs_TN[:, :E]
        denom_T1 = (real_probs_TE * real_TE).sum(-1, keepdim=True).clamp_min(1e-9)
        weights_TE = real_probs_TE / denom_T1  # only read at chosen real experts

        valid = valid_T(ctx, T, x_TD.device)
        aux = {}
        n_real = int(valid.sum())
        if self.balance_coef > 0 and n_real > 0:
            w = valid.float()[:, None]
            f_N = (chosen_TN.float() * w).sum(0) / chosen_TN[valid].sum().clamp_min(1)
            P_N = (probs_TN * w).sum(0) / n_real
            aux["aux_loss"] = self.balance_coef * N * (f_N * P_N).sum()
        if self.cfg.z_loss_coef > 0:
            aux["z_loss"] = self.cfg.z_loss_coef * z_loss(logits_TN, valid)

        probs_TE = real_probs_TE / real_probs_TE.sum(-1, keepdim=True)
        return RoutingResult.from_mask(
            real_TE, weights_TE, logits_TE=logits_TN[:, :E], probs_TE=probs_TE, k=None,
            valid_T=ctx_valid_or_none(ctx), aux_losses=aux, causal=True,
        )
