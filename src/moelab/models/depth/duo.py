"""Duo-LLM's per-token FFN choice: skip the FFN, run a small FFN, or run the big (original) FFN.

Alizadeh et al. 2024, "Duo-LLM: A Framework for Studying Adaptive Computation in Large Language Models":
each FFN layer has a small and a big module and, per token and layer, a router picks small, big or skip.
Here the big module is the block's own FFN (dense or MoE) and the small one a dense SwiGLU FFN of
``small_ff`` hidden units added next to it (trained by ``moelab.ops.depth.duo``). The router is
``Linear(D, 3)`` on the FFN's normed input; the decision is ``argmax(logits - penalty * cost)`` with
``cost = (0, small_cost, 1)`` (a calibrated price per unit of FFN compute that meets a budget; our choice).
Attention always runs. The last layer starts at weight 0, bias (0, 0, 1): untrained, every token takes the
big FFN (the unmodified model). Per-token decisions read only the token's own state: causal, cache-safe.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.models.depth.base import DepthRouter, forced_tokens

SKIP, SMALL, BIG = 0, 1, 2


class DuoRouter(DepthRouter):
    def __init__(self, d_model: int, layer_index: int, *, small_ff: int, small_cost: float) -> None:
        from moelab.models.transformer import DenseFFN

        super().__init__(layer_index)
        self.small = DenseFFN(d_model, small_ff)
        self.gate = nn.Linear(d_model, 3)
        with torch.no_grad():
            self.gate.weight.zero_()
            self.gate.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
        self.register_buffer("cost_3", torch.tensor([0.0, float(small_cost), 1.0]))
        self.register_buffer("penalty", torch.zeros(()))

    def choose_tokens(self, h_BLD: Tensor) -> Tensor:
        B, L = h_BLD.shape[:2]
        if self.forced is not None:
            return forced_tokens(self.forced, B, L, h_BLD.device)
        return (self.gate(h_BLD) - self.penalty * self.cost_3).argmax(-1)

    def forward(self, block, x_BLD: Tensor, cos_LDh: Tensor, sin_LDh: Tensor, ctx, kv_cache=None) -> Tensor:
        x1_BLD = block.attn_residual(x_BLD, cos_LDh, sin_LDh, kv_cache)
        h_BLD = block.ffn_norm(x1_BLD)
        c_BL = self.choose_tokens(h_BLD)
        self.last_action = c_BL
        if bool((c_BL == BIG).all()):
            return block.ffn_residual(x1_BLD, ctx)
        out_BLD = x1_BLD
        if bool((c_BL == SMALL).any()):
            out_BLD = torch.where((c_BL == SMALL)[..., None], x1_BLD + self.small(h_BLD), out_BLD)
        if bool((c_BL == BIG).any()):
            out_BLD = torch.where((c_BL == BIG)[..., None], block.ffn_residual(x1_BLD, ctx), out_BLD)
        return out_BLD
