"""Attention Router of Yuan 2.0-M32.

Wu et al. 2024, "Yuan 2.0-M32: Mixture of Experts with Attention Router" (arXiv:2405.17976;
code IEIT-Yuan/Yuan2.0-M32). A classical router scores every expert independently (one dot
product each); the attention router models correlations between experts: per token,
``q, k, v = x W_q, x W_k, x W_v`` (each ``[E]``, one scalar per expert), an ``E x E`` attention
``A = softmax(q k^T)`` (row-wise), and the expert logits are ``A v``. As in the released code
the three projections are one bias-free ``D -> 3E`` linear, computed in fp32.

Gating as in the Yuan MoE layer: the top-k logits, weights = softmax over the k selected logits
(k = 1 would make the weight constant 1, so k = 1 uses the full-softmax probability instead).
``probs_TE`` is the softmax of the logits over all experts (for balance losses).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.layers.config import MoEConfig
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits, select_topk
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "attention_router",
    description="Yuan 2.0-M32 attention router: per-token E x E attention over expert query/key/value scalars",
    paper="Wu et al. 2024, Yuan 2.0-M32: Mixture of Experts with Attention Router",
)
class AttentionRouter(Router):
    causal = True

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.qkv = GateLinear(cfg.d_model, 3 * cfg.num_experts, cfg.init_std)

    def expert_logits(self, x_TD: Tensor) -> Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            q_TE, k_TE, v_TE = self.qkv(x_TD).chunk(3, dim=-1)
            attn_TEE = torch.softmax(q_TE[:, :, None] * k_TE[:, None, :], dim=-1)
            return (attn_TEE @ v_TE[:, :, None]).squeeze(-1)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        logits_TE = check_finite_logits(self.expert_logits(x_TD), "attention_router")
        probs_TE = torch.softmax(logits_TE, dim=-1)
        idx_TK = select_topk(logits_TE, self.k, self.selection_bias())
        if self.k == 1:
            w_TK = probs_TE.gather(1, idx_TK)
        else:
            w_TK = torch.softmax(logits_TE.gather(1, idx_TK), dim=-1)
        return RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=logits_TE, probs_TE=probs_TE)
