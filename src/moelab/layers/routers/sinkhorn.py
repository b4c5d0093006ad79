"""Sinkhorn-balanced routing: S-BASE and Selective Sinkhorn Routing.

* S-BASE: Clark et al. 2022, "Unified Scaling Laws for Routed Language Models" (ICML 2022,
  arXiv:2202.01169). BASE layers solve a balanced linear assignment; S-BASE replaces the exact
  solver by the Sinkhorn algorithm: ``exp(logits)`` is rescaled alternately by rows and columns
  until every expert receives the same mass (columns sum to 1/E, rows to 1/T), and the experts
  are the top-k of that balanced matrix. The combine weights come from the *unbalanced* router
  (sigmoid of the logit for k = 1, as in BASE; softmax probabilities for k > 1), and the
  Sinkhorn matrix only picks experts (no gradient through it). At evaluation the router is a
  plain top-k of the same gate (no balancing).
  This mirrors Megatron-LM's ``sinkhorn_load_balancing`` (which follows the paper): tolerance
  1e-4 on the change of the column scaling.

* Selective Sinkhorn Routing (SSR): Nguyen et al. 2025, "Selective Sinkhorn Routing for Improved
  Sparse Mixture of Experts" (arXiv:2511.08972). Token-to-expert assignment is an entropic
  optimal-transport problem with balanced expert marginals; unlike S-BASE the *gates are read
  off the transport plan* (differentiable through the unrolled Sinkhorn iterations), and OT
  routing is applied only *selectively* -- a small fraction of training steps use it, the rest
  use plain softmax top-k -- so the Sinkhorn overhead stays small and no auxiliary balance loss
  is needed. Choices (the paper's full text could not be consulted here; recorded):
  a training forward uses OT with probability ``ot_prob`` (default 0.1, an independent draw per
  forward, i.e. per micro-batch); the plan is computed on ``logits / temperature``; the gates of
  the chosen experts are ``T * P[t, e]`` (each row of ``T * P`` sums to 1, like softmax
  probabilities); other steps and evaluation use softmax top-k with softmax probabilities as
  gates. ``ot_prob=1`` gives "always-OT" routing.

Padding tokens (``ctx.valid_T`` False) take no part in the transport problem; they get plain
top-k decisions.

router_kwargs: ``variant`` ("sbase" | "selective"), ``n_iters`` (max Sinkhorn iterations, 50),
``tol`` (1e-4), ``ot_prob`` (selective only, 0.1), ``temperature`` (selective only, 1.0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.errors import check_choice, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import sinkhorn_knopp, valid_mask
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "sinkhorn",
    description="Sinkhorn-balanced top-k in training (S-BASE; or selective OT gates from the transport plan), top-k at eval",
    paper="Clark et al. 2022, Unified Scaling Laws for Routed Language Models; "
    "Nguyen et al. 2025, Selective Sinkhorn Routing for Improved Sparse MoE",
)
class SinkhornRouter(Router):
    causal = False  # training: the Sinkhorn plan couples every token of the batch
    causal_eval = True  # eval: plain top-k of the logits, per token
    supports_aux_free = False  # in training a token's expert depends on the whole batch (balanced assignment)

    def __init__(self, cfg: MoEConfig, *, variant: str = "sbase", n_iters: int = 50, tol: float = 1e-4,
                 ot_prob: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__(cfg)
        self.variant = check_choice("router_kwargs.variant", variant, ["sbase", "selective"])
        self.n_iters = int(check_range("router_kwargs.n_iters", n_iters, low=1))
        self.tol = float(check_range("router_kwargs.tol", tol, low=0.0, low_inclusive=False))
        self.ot_prob = float(check_range("router_kwargs.ot_prob", ot_prob, low=0.0, high=1.0))
        self.temperature = float(check_range("router_kwargs.temperature", temperature, low=0.0, low_inclusive=False))
        self.num_experts, self.k = cfg.num_experts, cfg.k
        self.gate = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)
        self.last_used_ot = False  # for inspection: did the last forward use OT routing

    def _gate(self, logits_TE: Tensor) -> Tensor:
        if self.variant == "sbase" and self.k == 1:
            return torch.sigmoid(logits_TE)  # BASE-style sigmoid gate for top-1
        return torch.softmax(logits_TE, dim=-1)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        T = x_TD.shape[0]
        x_TD = self.check_input(x_TD)
        logits_TE = check_finite_logits(self.gate(x_TD), "sinkhorn")
        probs_TE = torch.softmax(logits_TE, dim=-1)
        gate_TE = self._gate(logits_TE)
        valid = valid_mask(ctx, T, x_TD.device)
        idx_TK = torch.topk(logits_TE.detach(), self.k, dim=-1).indices  # plain top-k (eval / padding)
        use_ot = self.training and int(valid.sum()) > 0
        if use_ot and self.variant == "selective":
            use_ot = bool(torch.rand(()) < self.ot_prob) if self.ot_prob < 1.0 else True
        self.last_used_ot = use_ot
        w_TE = gate_TE
        if use_ot:
            rows = valid.nonzero(as_tuple=True)[0]
            if self.variant == "sbase":
                with torch.no_grad():
                    plan = sinkhorn_knopp(logits_TE[rows], self.n_iters, self.tol)
                idx_TK = idx_TK.clone()
                idx_TK[rows] = torch.topk(plan, self.k, dim=-1).indices
            else:
                plan = sinkhorn_knopp(logits_TE[rows] / self.temperature, self.n_iters, self.tol)
                idx_TK = idx_TK.clone()
                idx_TK[rows] = torch.topk(plan.detach(), self.k, dim=-1).indices
                w_TE = gate_TE.clone()
                w_TE[rows] = plan * rows.numel()  # gates read off the transport plan
        weights_TK = w_TE.gather(1, idx_TK)
        return RoutingResult.from_topk(
            idx_TK, weights_TK, self.num_experts, logits_TE=logits_TE, probs_TE=probs_TE,
            valid_T=None if ctx is None or ctx.valid_T is None else valid, causal=not use_ot,
        )
