"""SMEAR: soft merging of experts with adaptive routing.

Muqeeth, Liu and Raffel 2023, "Soft Merging of Experts with Adaptive Routing" (TMLR 2024,
arXiv:2306.03745). Discrete routing needs gradient estimators; SMEAR avoids it: the router's
distribution ``p`` averages the experts' *parameters*, ``theta = sum_e p_e theta_e``, and the
input goes through the one merged expert. Fully differentiable, and the cost is one expert
(plus the merge) instead of k.

Merge granularity (``router_kwargs.merge``):
* ``"sequence"`` (default, the paper's choice): one routing decision per example. The router
  reads the average of the example's token representations (real tokens only) and each
  sequence of ``ctx.batch_shape = (B, L)`` gets its own merged expert (B merges). Without a
  batch shape all T tokens form one example. A token's expert then depends on later tokens of
  its sequence, so this mode is not causal (``RoutingResult.causal=False``): fine for
  encoders/classification as in the paper, a leak of the future for autoregressive LMs.
* ``"token"``: one merge per token from its own representation (causal). Computed without
  materialising T merged weight sets, using linearity: the merged input projection of token t is
  ``sum_e p_te (W_e x_t)`` and the merged output ``sum_e p_te W_down_e h_t`` -- the activation is
  applied to the *merged* pre-activation, which is what distinguishes merging from a dense
  mixture of expert outputs. Cost: E times one expert's matmuls.

SMEAR uses no load-balancing loss; set ``aux_loss="none"`` to reproduce the paper (with a Switch
loss, every expert counts every token, so only the mean-probability term acts). Capacity factors
do not apply (nothing is dispatched).

Runs through the MoE layer's ``forward_layer`` seam (it needs the experts' weights).
``forward`` alone returns the soft routing as data: every token routed to all E experts with
weight ``p_te`` (``k = E``), what stats and balance losses read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.errors import MoelabError, check_choice
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import layer_experts, valid_mask
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


def merged_expert_sequences(experts, x_BLD: Tensor, p_BE: Tensor) -> Tensor:
    """One merged expert per sequence: ``theta_b = sum_e p_be theta_e`` applied to ``x_b``."""
    p = p_BE.to(experts.w_up_EFD.dtype)
    w_up_BFD = torch.einsum("be,efd->bfd", p, experts.w_up_EFD)
    w_down_BDF = torch.einsum("be,edf->bdf", p, experts.w_down_EDF)
    up_BLF = torch.bmm(x_BLD, w_up_BFD.transpose(1, 2))
    if experts.w_gate_EFD is None:
        h_BLF = F.gelu(up_BLF)
    else:
        w_gate_BFD = torch.einsum("be,efd->bfd", p, experts.w_gate_EFD)
        h_BLF = F.silu(torch.bmm(x_BLD, w_gate_BFD.transpose(1, 2))) * up_BLF
    return torch.bmm(h_BLF, w_down_BDF.transpose(1, 2))


def merged_expert_tokens(experts, x_TD: Tensor, p_TE: Tensor) -> Tensor:
    """One merged expert per token (exact, via linearity of the merge in the weights)."""
    p = p_TE.to(experts.w_up_EFD.dtype)
    up_TF = torch.einsum("te,tef->tf", p, torch.einsum("td,efd->tef", x_TD, experts.w_up_EFD))
    if experts.w_gate_EFD is None:
        h_TF = F.gelu(up_TF)
    else:
        gate_TF = torch.einsum("te,tef->tf", p, torch.einsum("td,efd->tef", x_TD, experts.w_gate_EFD))
        h_TF = F.silu(gate_TF) * up_TF
    return torch.einsum("te,ted->td", p, torch.einsum("tf,edf->ted", h_TF, experts.w_down_EDF))


@ROUTERS.register(
    "smear",
    description="SMEAR: experts' parameters averaged by the router distribution, one merged expert run (per example or token)",
    paper="Muqeeth et al. 2023, Soft Merging of Experts with Adaptive Routing",
)
class SMEARRouter(Router):
    causal = False  # merge="sequence" (default); merge="token" is causal (is_causal)
    supports_aux_free = False

    def is_causal(self, training: bool | None = None) -> bool:
        """Sequence merging reads the mean of the whole sequence, in training and eval alike; it has
        no causal inference mode (autoregressive use is refused: ``moelab.models.causality``)."""
        return self.merge == "token"

    def __init__(self, cfg: MoEConfig, *, merge: str = "sequence") -> None:
        super().__init__(cfg)
        self.merge = check_choice("router_kwargs.merge", merge, ["sequence", "token"])
        self.gate = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)

    def _groups(self, T: int, ctx: RoutingContext | None) -> tuple[int, int]:
        if self.merge == "token":
            return T, 1
        bs = None if ctx is None else ctx.batch_shape
        if bs is None:
            return 1, T
        B, L = int(bs[0]), int(bs[1])
        if B * L != T:
            raise MoelabError(f"ctx.batch_shape={tuple(bs)} does not match T={T} tokens")
        return B, L

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        T, E = x_TD.shape[0], self.num_experts
        B, L = self._groups(T, ctx)
        if self.merge == "token" or T == 0:  # no tokens: nothing to merge, an empty routing
            logits_TE = check_finite_logits(self.gate(x_TD), "smear")
        else:
            vf = valid_mask(ctx, T, x_TD.device).float().view(B, L, 1)
            xbar_BD = (x_TD.float().view(B, L, -1) * vf).sum(1) / vf.sum(1).clamp_min(1.0)
            logits_TE = check_finite_logits(self.gate(xbar_BD), "smear").repeat_interleave(L, dim=0)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        mask = torch.ones(T, E, dtype=torch.bool, device=x_TD.device)
        r = RoutingResult.from_mask(mask, probs_TE, logits_TE=logits_TE, probs_TE=probs_TE,
                                    causal=self.merge == "token")
        r.k = E
        return r

    def forward_layer(self, layer, x_TD: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, RoutingResult]:
        experts = layer_experts(layer, "smear")
        routing = self(x_TD, ctx)
        p_TE = routing.probs_TE
        T = x_TD.shape[0]
        B, L = self._groups(T, ctx)
        if T == 0:
            y_TD = x_TD.new_zeros(x_TD.shape)
        elif self.merge == "token":
            y_TD = merged_expert_tokens(experts, x_TD, p_TE)
        else:
            p_BE = p_TE.view(B, L, -1)[:, 0]
            y_TD = merged_expert_sequences(experts, x_TD.view(B, L, -1), p_BE).reshape(T, -1)
        return y_TD.to(x_TD.dtype), routing
