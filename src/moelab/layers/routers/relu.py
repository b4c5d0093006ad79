"""ReLU routing with adaptive L1 regularisation (ReMoE).

Wang et al. 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing"
(arXiv:2412.14711, ICLR 2025; code: thu-ml/ReMoE on Megatron-LM).

The gate is ``R(x) = ReLU(W_r x)``: an expert is active iff its gate is positive, the combine
weight is the gate itself (no softmax, no renormalisation), so routing is continuous and fully
differentiable, and the number of active experts varies per token. Sparsity is steered to a
target ``1 - k/E`` by an L1 penalty whose coefficient adapts multiplicatively each training step:

    lambda_{t+1} = lambda_t * alpha ** sign((1 - k/E) - S_t),

``S_t`` the fraction of zero gates (too many active experts -> lambda grows). ReMoE folds load
balancing into the penalty ("load-balanced L1"): each expert's gates are weighted by its relative
load ``f_e = E/(k T) * #{t: R_e(x_t) > 0}`` (detached), ``L = lambda * mean_t sum_e f_e R_e(x_t)``.

Choices (documented):
* Defaults follow the paper: ``lambda_0 = 1e-8``, ``alpha = 1.2``, target k = ``cfg.k``;
  ``load_balance=True``. With ReMoE's load-balanced L1 the router owns its balancing: its
  ``balance_losses`` drops the layer's ``aux_loss`` (``cfg.aux_loss`` is ignored; the z-loss on
  ``W_r x`` still applies), as in the paper, which uses no separate balance loss.
* The paper computes ``S_t`` over all MoE layers with one shared lambda; moelab keeps one lambda
  per layer (each router is self-contained), so each layer is steered to ``k`` separately. The
  paper's ``1/L`` factor is dropped for the same reason (the adaptive lambda absorbs any constant).
* lambda is updated after the loss is formed, once per training forward (``self.training`` and
  grad enabled; with gradient accumulation that is once per micro-batch), from real tokens only;
  it is a buffer, so it is checkpointed. Evaluation never changes it.
* ``probs_TE`` (used by stats) is the gate normalised to sum 1 per token (all-zero rows stay
  zero); ``logits_TE`` is ``W_r x``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from moelab.errors import check_range
from moelab.layers.balancing import balance_losses
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo1_common import ctx_valid_or_none, masked_mean, valid_T
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "relu",
    description="ReLU gates (differentiable, variable k) + adaptive load-balanced L1 steering active experts to k",
    paper="Wang et al. 2024, ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing (arXiv:2412.14711)",
)
class ReLURouter(Router):
    """ReMoE router. router_kwargs: ``target_k`` (default cfg.k), ``l1_init`` (1e-8),
    ``l1_alpha`` (1.2, > 1), ``load_balance`` (True)."""

    causal = True
    supports_aux_free = False  # no ranking: an expert is active iff its gate is positive

    def __init__(self, cfg: MoEConfig, *, target_k: float | None = None, l1_init: float = 1e-8,
                 l1_alpha: float = 1.2, load_balance: bool = True) -> None:
        super().__init__(cfg)
        E = cfg.num_experts
        self.target_k = float(check_range("router_kwargs.target_k", cfg.k if target_k is None else target_k,
                                          low=0.0, high=float(E), low_inclusive=False))
        self.l1_alpha = float(check_range("router_kwargs.l1_alpha", l1_alpha, low=1.0, low_inclusive=False))
        check_range("router_kwargs.l1_init", l1_init, low=0.0, low_inclusive=False)
        self.load_balance = bool(load_balance)
        self.gate = GateLinear(cfg.d_model, E, cfg.init_std)
        self.register_buffer("l1_coef", torch.tensor(float(l1_init), dtype=torch.float32))

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.target_k / self.num_experts

    def balance_losses(self, routing: RoutingResult, ctx: RoutingContext | None = None) -> dict[str, Tensor]:
        """Only the z-loss: ReMoE balances through its load-balanced L1 (``aux_losses["relu_l1"]``)."""
        return balance_losses(routing, replace(self.cfg, aux_loss="none"), ctx)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = check_finite_logits(self.gate(x_TD), "relu")
        gates_TE = torch.relu(logits_TE)
        active_TE = gates_TE.detach() > 0
        valid = valid_T(ctx, T, x_TD.device)
        active_real_TE = active_TE & valid[:, None]
        n_real = int(valid.sum())

        if self.load_balance and n_real > 0:
            f_E = active_real_TE.sum(0).float() * E / (self.target_k * n_real)
        else:
            f_E = torch.ones(E, device=x_TD.device)
        reg = masked_mean((gates_TE * f_E).sum(-1), valid)
        aux = {"relu_l1": reg * float(self.l1_coef)}

        if self.training and torch.is_grad_enabled() and n_real > 0:
            with torch.no_grad():
                sparsity = 1.0 - float(active_real_TE.sum()) / (n_real * E)
                step = (self.target_sparsity > sparsity) - (self.target_sparsity < sparsity)
                self.l1_coef.mul_(self.l1_alpha ** step)

        probs_TE = gates_TE / gates_TE.sum(-1, keepdim=True).clamp_min(1e-9)
        return RoutingResult.from_mask(
            active_TE, gates_TE, logits_TE=logits_TE, probs_TE=probs_TE, k=None,
            valid_T=ctx_valid_or_none(ctx), aux_losses=aux, causal=True,
        )
