"""SMoRA (Zhao et al. 2025, "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA"): one
LoRA of rank r per projection whose rank-1 components are the experts; a router over the r ranks activates
the top-k per token: ``dW x = alpha * sum_{i in top-k} g_i b_i (a_i^T x)`` with g the renormalised top-k
router probabilities.

Choices: the scale is ``alpha`` times gates summing to 1 (with uniform gates, a rank-k LoRA at
scale alpha / k); the router reads the projection's input; balance is the Switch loss over ranks times
``aux_loss_coef``. Needs k <= rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import check_range
from moelab.ops.lora.base import (
    AdapterConfig, AdaptedFFN, Router, balance, build_projection_adapter, lora_pair, topk_weights,
)
from moelab.ops.lora.registry import ADAPTERS


class SMoRADelta(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, cfg: AdapterConfig) -> None:
        super().__init__()
        check_range("k", cfg.k, low=1, high=cfg.rank)
        self.cfg = cfg
        self.A_rI, self.B_Or = lora_pair(None, cfg.rank, in_dim, out_dim)
        self.router = Router(in_dim, cfg.rank, torch.Generator().manual_seed(cfg.seed))
        self.aux: dict[str, Tensor] = {}

    def forward(self, x_TI: Tensor) -> Tensor:
        probs_Tr = self.router(x_TI)
        g_Tr = topk_weights(probs_Tr, self.cfg.k)
        self.aux = {"aux_loss": balance(probs_Tr, g_Tr, self.cfg.aux_loss_coef)}
        return self.cfg.alpha * F.linear(F.linear(x_TI, self.A_rI) * g_Tr.to(x_TI.dtype), self.B_Or)


@ADAPTERS.register("smora", description="each rank of one LoRA is an expert; rank-wise top-k routing",
                   paper="Zhao et al. 2025 (SMoRA)")
def build_smora(base: nn.Module, cfg: AdapterConfig, **_: object) -> AdaptedFFN:
    return build_projection_adapter(base, cfg, lambda t, i, o: SMoRADelta(i, o, cfg))
