"""Token-choice softmax top-k router: Switch (k=1), GShard (k=2), Mixtral (k=2, top-k then softmax).

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_choice
from moelab.layers.config import MoEConfig
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits, select_topk
from moelab.layers.routing import RoutingContext, RoutingResult

SCORE_ORDERS = ("softmax_then_topk", "topk_then_softmax")


@ROUTERS.register(
    "softmax_topk",
    description="softmax gate, top-k experts per token (Switch k=1, GShard k=2, Mixtral)",
    paper="Fedus et al. 2021 (Switch); Lepikhin et al. 2020 (GShard); Jiang et al. 2024 (Mixtral)",
)
class SoftmaxTopKRouter(Router):
    """Each token picks its k highest-scoring experts of a linear softmax gate.

    ``score_order="softmax_then_topk"`` (Switch, GShard): ``p = softmax(xW)`` over all E experts,
    take the top-k of p, weights = the selected p, divided by their sum when ``renormalize``
    (GShard normalises its top-2 gates; Switch k=1 keeps the raw p so the router gets a gradient).
    ``score_order="topk_then_softmax"`` (Mixtral): top-k of the logits, weights = softmax over the k
    selected logits (always sums to 1; equals softmax_then_topk with renormalize). ``renormalize``
    defaults to ``k > 1``.

    k=1 with weights forced to 1 (topk_then_softmax, or renormalize=True) gives the router no
    gradient from the language-model loss (Megatron requires pre-softmax for k=1); it is rejected.

    Aux-loss-free bias (choice of ours; DeepSeek-V3 defines it for sigmoid scores): added to the
    probabilities for softmax_then_topk and to the logits for topk_then_softmax, selection only.
    ``probs_TE`` is the full softmax over E experts (what the Switch loss uses).

    ``bias=True`` adds a learned per-expert bias to the logits (GPT-OSS's router is a Linear with
    bias, followed by top-k of the logits and a softmax over the k selected: ``score_order=
    "topk_then_softmax"``); it starts at zero. Default False (no parameter: old checkpoints load).
    """

    def __init__(self, cfg: MoEConfig, *, score_order: str = "softmax_then_topk",
                 renormalize: bool | None = None, bias: bool = False) -> None:
        super().__init__(cfg)
        check_choice("score_order", score_order, SCORE_ORDERS)
        if renormalize is not None and not isinstance(renormalize, bool):
            raise MoelabError(f"renormalize={renormalize!r} must be True, False or None")
        self.score_order = score_order
        self.renormalize = (cfg.k > 1) if renormalize is None else renormalize
        if cfg.k == 1 and (score_order == "topk_then_softmax" or self.renormalize):
            raise MoelabError(
                f"k=1 with score_order={score_order!r}, renormalize={self.renormalize} makes every weight 1 "
                "and the router untrainable; use score_order='softmax_then_topk', renormalize=False"
            )
        self.gate = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)
        if not isinstance(bias, bool):
            raise MoelabError(f"bias={bias!r} must be True or False")
        self.bias_E = torch.nn.Parameter(torch.zeros(cfg.num_experts)) if bias else None

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        logits_TE = self.gate(x_TD)
        if self.bias_E is not None:
            logits_TE = logits_TE + self.bias_E.float()
        logits_TE = check_finite_logits(logits_TE, "softmax_topk")
        probs_TE = torch.softmax(logits_TE, dim=-1)
        bias_E = self.selection_bias()
        if self.score_order == "softmax_then_topk":
            idx_TK = select_topk(probs_TE, self.k, bias_E)
            w_TK = probs_TE.gather(1, idx_TK)
            if self.renormalize:
                w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        else:
            idx_TK = select_topk(logits_TE, self.k, bias_E)
            w_TK = torch.softmax(logits_TE.gather(1, idx_TK), dim=-1)
        return RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=logits_TE, probs_TE=probs_TE)
