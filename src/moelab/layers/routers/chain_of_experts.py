"""Chain-of-Experts (CoE): several routing iterations inside one MoE layer.

Wang et al. 2025, "Chain-of-Experts: Unlocking the Communication Power of Mixture-of-Experts
Models" (arXiv:2506.18945; code ZihanWang314/coe). Tokens pass through the layer's experts C
times; each iteration has its *own router* (over the same experts), so a token can re-select
experts after seeing the previous iteration's output, with an inner residual:

    x^(0) = x,    x^(t) = x^(t-1) + sum_{i in TopK(R_t(x^(t-1)))} g_{t,i} E_i(x^(t-1)),   t = 1..C.

The paper attributes CoE's gains to this iterative residual structure plus per-iteration
routing; 2 iterations with top-k match 3x wider selection at fixed compute.

As in the paper: iteration t keeps the top ``K/C`` experts of its router's softmax scores
(compute-matched with a standard top-K layer; ``k_per_iter`` overrides, default
``max(1, cfg.k // n_iters)``) and the gate is the raw softmax score ``g_{t,i} = s_{t,i}`` of the
selected experts (not renormalised).

Residual (``router_kwargs.residual``), as in the official code (ZihanWang314/coe; its two modes,
read from the issue-13 audit of that code, which could not be fetched here):

* ``"inner"`` (default, the official default): the inner residual above, and the layer's output
  ``x^(C) = norm(h) + sum of the C updates`` *replaces* the block's residual stream: the block adds
  no outer residual ``h`` (the layer declares ``block_residual = False``, which
  ``moelab.models.transformer.Block`` reads).
* ``"outer"``: no inner residual, ``x^(t) = sum_i g_{t,i} E_i(x^(t-1))``, and the block adds its
  outer residual: the block outputs ``h + x^(C)``.

(Before issue 13 the layer returned ``x^(C)`` including ``x^(0) = norm(h)`` and the block added
``h`` as well, so a block computed ``h + norm(h) + updates``: neither official mode.)

Runs through the MoE layer's ``forward_layer`` seam. The routing returned to the layer (stats,
balance losses) is the *first* iteration's; the balance losses of iterations 2..C are computed
with the layer's balancing and added to its ``aux_losses`` (keys suffixed ``_iter{t}``), so
every router is balanced. With ``aux_loss="global"`` each iteration's router has its own
global-batch accumulator (``iter_global_load[t-1]``), fed with that iteration's own routing.
``forward`` alone routes the first iteration.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from moelab.errors import check_choice, check_range
from moelab.layers.balancing import GlobalLoadAccumulator, balance_losses
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import dispatch_via_layer, layer_experts
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


RESIDUAL_MODES = ("inner", "outer")


@ROUTERS.register(
    "chain_of_experts",
    description="Chain-of-Experts: C routing iterations per layer, a router per iteration, inner residual",
    paper="Wang et al. 2025, Chain-of-Experts: Unlocking the Communication Power of MoE Models",
)
class ChainOfExpertsRouter(Router):
    causal = True
    supports_aux_free = False

    def __init__(self, cfg: MoEConfig, *, n_iters: int = 2, k_per_iter: int | None = None,
                 residual: str = "inner") -> None:
        super().__init__(cfg)
        self.n_iters = int(check_range("router_kwargs.n_iters", n_iters, low=1))
        kk = max(1, cfg.k // self.n_iters) if k_per_iter is None else k_per_iter
        self.k_iter = int(check_range("router_kwargs.k_per_iter", kk, low=1, high=cfg.num_experts))
        self.residual = check_choice("router_kwargs.residual", residual, RESIDUAL_MODES)
        self.gates = nn.ModuleList(GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std) for _ in range(self.n_iters))
        self.iter_global_load = nn.ModuleList(
            GlobalLoadAccumulator(cfg.num_experts) for _ in range(self.n_iters - 1)) if cfg.aux_loss == "global" else None

    @property
    def block_residual(self) -> bool:
        """Whether the transformer block adds its outer residual to this layer's output."""
        return self.residual == "outer"

    def route(self, it: int, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        logits_TE = check_finite_logits(self.gates[it](x_TD), "chain_of_experts")
        probs_TE = torch.softmax(logits_TE, dim=-1)
        idx_TK = torch.topk(probs_TE.detach(), self.k_iter, dim=-1).indices
        w_TK = probs_TE.gather(1, idx_TK)  # g_{t,i} = s_{t,i}: raw scores of the selected experts
        valid = None if ctx is None or ctx.valid_T is None else ctx.valid_T.reshape(-1).bool()
        return RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=logits_TE, probs_TE=probs_TE,
                                       valid_T=valid)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        return self.route(0, self.check_input(x_TD), ctx)

    def iteration_losses(self, it: int, routing: RoutingResult, ctx: RoutingContext | None) -> dict[str, Tensor]:
        """Balance losses of iteration ``it >= 1``, with that iteration's own global accumulator."""
        acc = None if self.iter_global_load is None else self.iter_global_load[it - 1]
        self.finish_routing(routing, ctx, global_load=acc)
        return balance_losses(routing, self.cfg, ctx, accumulator=acc)

    def forward_layer(self, layer, x_TD: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, RoutingResult]:
        experts = layer_experts(layer, "chain_of_experts")
        x_t = x_TD
        first: RoutingResult | None = None
        extra = {}
        for it in range(self.n_iters):
            routing = self(x_t, ctx) if it == 0 else self.route(it, x_t, ctx)
            update_TD, routing = dispatch_via_layer(layer, x_t, routing, experts)
            x_t = x_t + update_TD if self.residual == "inner" else update_TD
            if it == 0:
                first = routing
            else:
                for name, v in self.iteration_losses(it, routing, ctx).items():
                    extra[f"{name}_iter{it}"] = v
        assert first is not None
        return x_t, replace(first, aux_losses={**first.aux_losses, **extra})
