"""MixLoRA (Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based
Mixture of Experts"): inside each frozen dense FFN, E experts that are the FFN with their own LoRA on
gate, up and down, chosen per token by a top-k router, plus the Switch balance loss.

Expert e: ``(W_down + dW_down_e)(silu((W_gate + dW_gate_e) x) * ((W_up + dW_up_e) x))``; the layer
returns ``sum_{e in top-k} w_e expert_e(x)`` with softmax-then-top-k weights renormalised to 1
(as the paper's Mixtral-style router). Choices: the frozen ``W_gate x`` and ``W_up x`` are computed once
and shared by all experts (the same values); the balance loss is moelab's Switch loss (1 at balance)
times ``aux_loss_coef`` (the paper's 0.01). Zero-initialised B makes every expert the base FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import check_range
from moelab.ops.lora.base import AdapterConfig, Router, attach_aux, balance, check_rank, lora_pair, topk_weights
from moelab.ops.lora.registry import ADAPTERS
from moelab.ops.upcycle.dense import ffn_weights


def lowrank(x_TI: Tensor, A_rI: Tensor, B_Or: Tensor) -> Tensor:
    return F.linear(F.linear(x_TI, A_rI), B_Or)


class MixLoRAFFN(nn.Module):
    """The frozen FFN ``base`` with E LoRA experts and a top-k router (see the module docstring)."""

    def __init__(self, base: nn.Module, cfg: AdapterConfig, n_experts: int | None = None) -> None:
        super().__init__()
        w = ffn_weights(base)
        E, r, D, Fh = n_experts or cfg.experts, cfg.rank, w.d_model, w.d_ff
        check_range("k", cfg.k, low=1, high=E)
        check_rank(r, D, Fh, where="the FFN (MixLoRA experts)")
        self.base, self.cfg, self.k, self.scale = base, cfg, cfg.k, cfg.alpha / r
        self.router = Router(D, E, torch.Generator().manual_seed(cfg.seed))
        self.A_gate_ErD, self.B_gate_EFr = lora_pair(E, r, D, Fh)
        self.A_up_ErD, self.B_up_EFr = lora_pair(E, r, D, Fh)
        self.A_down_ErF, self.B_down_EDr = lora_pair(E, r, Fh, D)
        self.aux_loss_scale = 1.0
        self.last_aux: dict[str, Tensor] = {}

    def route(self, x_TD: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Combine weights ``[T, E]`` (zeros for unused experts) and the balance losses."""
        probs_TE = self.router(x_TD)
        w_TE = topk_weights(probs_TE, self.k)
        return w_TE, {"aux_loss": balance(probs_TE, w_TE, self.cfg.aux_loss_coef)}

    def expert(self, e: int, x_ND: Tensor, g0_NF: Tensor, u0_NF: Tensor, w) -> Tensor:
        s = self.scale
        g_NF = g0_NF + s * lowrank(x_ND, self.A_gate_ErD[e], self.B_gate_EFr[e])
        u_NF = u0_NF + s * lowrank(x_ND, self.A_up_ErD[e], self.B_up_EFr[e])
        h_NF = F.silu(g_NF) * u_NF
        return F.linear(h_NF, w.w_down_DF) + s * lowrank(h_NF, self.A_down_ErF[e], self.B_down_EDr[e])

    def forward(self, x: Tensor) -> Tensor:
        w = ffn_weights(self.base)
        x_TD = x.reshape(-1, x.shape[-1])
        w_TE, aux = self.route(x_TD)
        g0_TF, u0_TF = F.linear(x_TD, w.w_gate_FD), F.linear(x_TD, w.w_up_FD)
        y_TD = torch.zeros_like(x_TD)
        for e in range(w_TE.shape[1]):
            idx_N = (w_TE[:, e] > 0).nonzero().squeeze(1)
            if idx_N.numel():
                y_NE = self.expert(e, x_TD[idx_N], g0_TF[idx_N], u0_TF[idx_N], w)
                y_TD = y_TD.index_add(0, idx_N, w_TE[idx_N, e, None].to(y_NE.dtype) * y_NE)
        return attach_aux(self, y_TD, aux).reshape(x.shape)


@ADAPTERS.register("mixlora", description="top-k LoRA experts inside each FFN + balance loss",
                   paper="Li et al. 2024 (MixLoRA)")
def build_mixlora(base: nn.Module, cfg: AdapterConfig, **_: object) -> MixLoRAFFN:
    return MixLoRAFFN(base, cfg)
