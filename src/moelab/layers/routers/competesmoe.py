"""CompeteSMoE: route by the experts' own responses (competition) and distil that into the router.

Nguyen et al. 2025, "CompeteSMoE -- Statistically Guaranteed Mixture of Experts Training via
Competition" (arXiv:2505.13380, improving arXiv:2402.02526; code Fsoft-AIC/CompeteSMoE).
Competition: run *every* expert on the token and send it to the k experts with the highest
neural response; the router is trained to predict the competition outcome, so most steps use the
cheap router. Following the released implementation (``competesmoe.py``):

* affinity ``s_{t,e} = mean_d softplus(E_e(x_t))_d`` (response of expert e);
* competition step: top-k experts by affinity, combine weights = the selected affinities divided
  by their sum (gradient flows into the experts through both outputs and weights); router loss
  ``MSE(softmax(router logits), softmax(s).detach())`` times ``router_loss_coef`` (default 1.0);
  optional expert-diversity loss (mean pairwise cosine similarity of the k selected outputs,
  ``diversity_coef``, default 0); ``probs_TE = softmax(s)`` so the layer's balance loss acts on
  the competition distribution (the code's ``balance_loss`` on affinities);
* other steps: the router's softmax top-k (weights renormalised), ordinary balance losses;
* schedule: no competition during the first ``warm_up`` training steps (router-only warm-up),
  afterwards each training step competes with probability ``rate`` (the code pre-draws this
  Bernoulli sequence; we draw it per forward). Evaluation always uses the router.

Global-batch balance (``aux_loss="global"``): the accumulator is fed with the routing that was
executed (the competition's on competition steps, the router's otherwise), so the loss on a
competition step reads the competition's counts (before issue 13 it read the router's).

Driving the schedule: a ``step`` buffer advances in every training forward with grad enabled
(once per micro-batch); it is checkpointed. Competition needs the experts, so it runs through the
MoE layer's ``forward_layer`` seam; ``forward`` alone is the router policy. The code's
multi-layer cap on simultaneous competitions (``max_compete_in_iter``) is not reproduced (each
layer draws independently). Cost of a competition step: all E experts on every token; capacity
factors apply to router steps only (a competition step computes every expert anyway).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.errors import check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import all_experts_TEd, dispatch_via_layer, layer_experts, softmax_topk, valid_mask
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "competesmoe",
    description="CompeteSMoE: some training steps route by expert responses (competition), router distilled to predict it",
    paper="Nguyen et al. 2025, CompeteSMoE -- Statistically Guaranteed Mixture of Experts Training via Competition",
)
class CompeteSMoERouter(Router):
    causal = True
    supports_aux_free = False

    def __init__(self, cfg: MoEConfig, *, rate: float = 0.5, warm_up: int = 0, router_loss_coef: float = 1.0,
                 diversity_coef: float = 0.0) -> None:
        super().__init__(cfg)
        self.rate = float(check_range("router_kwargs.rate", rate, low=0.0, high=1.0))
        self.warm_up = int(check_range("router_kwargs.warm_up", warm_up, low=0))
        self.router_loss_coef = float(check_range("router_kwargs.router_loss_coef", router_loss_coef, low=0.0))
        self.diversity_coef = float(check_range("router_kwargs.diversity_coef", diversity_coef, low=0.0))
        self.gate = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.last_competed = False

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        logits_TE = check_finite_logits(self.gate(x_TD), "competesmoe")
        idx_TK, w_TK, probs_TE = softmax_topk(logits_TE, self.k)
        return RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=logits_TE, probs_TE=probs_TE)

    def competes_now(self) -> bool:
        """Draw this training step's decision (advances the step counter)."""
        step = int(self.step)
        self.step += 1
        if step < self.warm_up or self.rate == 0.0:
            return False
        return self.rate >= 1.0 or bool(torch.rand(()) < self.rate)

    def competition(self, experts, x_TD: Tensor, logits_TE: Tensor, valid: Tensor):
        """``(y_TD, idx_TK, w_TK, affinity_softmax_TE, aux)`` of one competition step."""
        out_TED = all_experts_TEd(experts, x_TD)
        s_TE = F.softplus(out_TED.float()).mean(-1)
        s_sm_TE = torch.softmax(s_TE, dim=-1)
        sel_TK = torch.topk(s_TE.detach(), self.k, dim=-1).indices
        a_TK = s_TE.gather(1, sel_TK)
        w_TK = a_TK / a_TK.sum(-1, keepdim=True)
        top_TKD = out_TED.gather(1, sel_TK[:, :, None].expand(-1, -1, out_TED.shape[-1]))
        y_TD = (w_TK.to(top_TKD.dtype)[:, :, None] * top_TKD).sum(1)
        vf = valid.float()
        n = vf.sum().clamp_min(1.0)
        mse_T = ((torch.softmax(logits_TE, dim=-1) - s_sm_TE.detach()) ** 2).mean(-1)
        aux = {"compete_router": self.router_loss_coef * (mse_T * vf).sum() / n}
        if self.diversity_coef > 0 and self.k > 1:
            u = F.normalize(top_TKD.float(), dim=-1)
            sim_TKK = u @ u.transpose(1, 2)
            off = 1.0 - torch.eye(self.k, device=x_TD.device)
            div_T = (sim_TKK * off).sum((1, 2)) / (self.k * self.k)
            aux["compete_diversity"] = self.diversity_coef * (div_T * vf).sum() / n
        return y_TD, sel_TK, w_TK, s_sm_TE, aux

    def forward_layer(self, layer, x_TD: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, RoutingResult]:
        experts = layer_experts(layer, "competesmoe")
        routing = self.forward(x_TD, ctx)  # no hook yet: only the routing executed feeds the accumulators
        compete = self.training and torch.is_grad_enabled() and self.competes_now()
        self.last_competed = compete
        if not compete:
            return dispatch_via_layer(layer, x_TD, self.finish_routing(routing, ctx), experts)
        valid = valid_mask(ctx, x_TD.shape[0], x_TD.device)
        y_TD, idx_TK, w_TK, s_sm_TE, aux = self.competition(experts, x_TD, routing.logits_TE, valid)
        comp = RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=routing.logits_TE,
                                       probs_TE=s_sm_TE, aux_losses=aux)
        return y_TD.to(x_TD.dtype), self.finish_routing(comp, ctx)
