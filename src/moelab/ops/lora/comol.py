"""CoMoL (core-space mixture of LoRA): each expert is an ``r x r`` core C_i inside one shared LoRA frame
(A, B): ``dW x = (alpha / r) B (sum_i g_i C_i) A x``. The router works in the same low-rank space (it
reads ``A x``), and the selected cores are soft-merged into one core per token, so the cost is about one
LoRA's.

Choices: cores start at the identity (with B = 0 the delta is zero; with uniform gates CoMoL starts as a
plain LoRA), the top-k (``k``; k = experts is fully soft) router weights are renormalised, Switch balance
loss times ``aux_loss_coef``.
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


class CoMoLDelta(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, cfg: AdapterConfig) -> None:
        super().__init__()
        check_range("k", cfg.k, low=1, high=cfg.experts)
        self.cfg, self.scale = cfg, cfg.alpha / cfg.rank
        self.A_rI, self.B_Or = lora_pair(None, cfg.rank, in_dim, out_dim)
        self.C_Err = nn.Parameter(torch.eye(cfg.rank).repeat(cfg.experts, 1, 1))
        self.router = Router(cfg.rank, cfg.experts, torch.Generator().manual_seed(cfg.seed))
        self.aux: dict[str, Tensor] = {}

    def forward(self, x_TI: Tensor) -> Tensor:
        z_Tr = F.linear(x_TI, self.A_rI)
        probs_TE = self.router(z_Tr)
        g_TE = topk_weights(probs_TE, self.cfg.k).to(z_Tr.dtype)
        self.aux = {"aux_loss": balance(probs_TE, g_TE, self.cfg.aux_loss_coef)}
        zc_Tr = torch.einsum("te,erq,tq->tr", g_TE, self.C_Err, z_Tr)
        return self.scale * F.linear(zc_Tr, self.B_Or)


@ADAPTERS.register("comol", description="r x r core experts in one LoRA frame, soft-merged by a low-rank router",
                   paper="CoMoL (core-space mixture of LoRA), seed catalog #36")
def build_comol(base: nn.Module, cfg: AdapterConfig, **_: object) -> AdaptedFFN:
    return build_projection_adapter(base, cfg, lambda t, i, o: CoMoLDelta(i, o, cfg))
