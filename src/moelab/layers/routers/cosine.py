"""Cosine routing against learned centroids in a low-dimensional space.

Ternovtsii & Bilak 2026, "Equifinality in Mixture of Experts: Routing Topology Does Not Determine
Language Modeling Quality" (arXiv:2604.14419): project the hidden state to ``d_space = 64``,
L2-normalise, score experts by cosine similarity to learned (normalised) centroids; 80% fewer
routing parameters than a linear router. The same form is X-MoE's router (Chi et al. 2022, "On the
Representation Collapse of Sparse Mixture of Experts": low-dimensional projection, L2 norm,
learnable temperature) and Tutel's ``CosineTopKGate`` (Hwang et al. 2023), whose temperature is a
learnable log-scale ``s`` with ``logits = cos * exp(min(s, log(1/0.01)))`` (scale clamped at 100).

    logits_TE = cos(P x, c_e) * exp(min(s, log 100)),  probs = softmax(logits), top-k, renormalise.

Choices (documented):
* The projection has **no bias** (Tutel's has one): with a bias-free projection the routing is a
  function of the direction of ``x`` only, i.e. invariant to the scale of the input, which is what
  makes geometric routing robust to the growth of the residual-stream norm.
* ``d_space`` defaults to 64 (Equifinality); ``init_temperature`` to 0.5 (Tutel's ``init_t``) so the
  initial scale is 2; ``max_scale`` 100 (Tutel's clamp ``log(1/0.01)``). Centroids start at
  N(0, 0.01) like Tutel's ``sim_matrix`` (only their direction matters).
* Softmax over the scaled cosines, top-k, weights renormalised over the top-k (Tutel's
  ``normalize_gate``) when k > 1; for k = 1 the raw probability (Switch), so that the router is
  trained by the language-model loss. Logits are fp32. Balance losses are the layer's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.errors import check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo1_common import check_int, cosine_TE, ctx_valid_or_none
from moelab.layers.routers.base import ROUTERS, Router, check_finite_logits, select_topk
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "cosine",
    description="cosine similarity to learned centroids in a d_space=64 projection, learned clamped temperature",
    paper="Ternovtsii & Bilak 2026, Equifinality in Mixture of Experts (arXiv:2604.14419); X-MoE (Chi et al. 2022); Tutel CosineTopKGate",
)
class CosineRouter(Router):
    """router_kwargs: ``d_space`` (64), ``init_temperature`` (0.5), ``max_scale`` (100.0)."""

    causal = True

    def __init__(self, cfg: MoEConfig, *, d_space: int = 64, init_temperature: float = 0.5,
                 max_scale: float = 100.0) -> None:
        super().__init__(cfg)
        E = cfg.num_experts
        P = check_int("router_kwargs.d_space", d_space, 1)
        check_range("router_kwargs.init_temperature", init_temperature, low=0.0, low_inclusive=False)
        check_range("router_kwargs.max_scale", max_scale, low=1.0)
        self.proj_PD = torch.nn.Parameter(torch.randn(P, cfg.d_model) / math.sqrt(cfg.d_model))
        self.centroids_EP = torch.nn.Parameter(torch.randn(E, P) * 0.01)
        self.log_scale = torch.nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))
        self.max_log_scale = math.log(max_scale)

    def scale(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            z_TP = x_TD.float() @ self.proj_PD.float().t()
            logits_TE = cosine_TE(z_TP, self.centroids_EP) * self.scale().float()
        check_finite_logits(logits_TE, "cosine")
        probs_TE = logits_TE.softmax(-1)
        # aux-free bias (if configured) is added to the probabilities for selection only
        idx_TK = select_topk(probs_TE, self.k, self.selection_bias())
        top_TK = probs_TE.gather(1, idx_TK)
        # k=1 keeps the raw probability (Switch): a renormalised single weight would be 1 and the
        # router would get no gradient from the language-model loss
        weights_TK = top_TK / top_TK.sum(-1, keepdim=True) if self.k > 1 else top_TK
        return RoutingResult.from_topk(
            idx_TK, weights_TK, self.num_experts, logits_TE=logits_TE, probs_TE=probs_TE,
            valid_T=ctx_valid_or_none(ctx), causal=True,
        )
