"""Expert-router coupling (ERC) loss, and a softmax top-k router trained with it.

Lv et al. 2025, "Coupling Experts and Routers in Mixture-of-Experts via an Auxiliary Loss"
(arXiv:2512.23447, ICLR 2026). Row ``R[i]`` of the router matrix ``R [n, d]`` acts as the centre
of the tokens routed to expert i, i.e. a *proxy token* for them. The proxies are perturbed with
bounded multiplicative noise, ``R~[i] = R[i] * delta_i``, ``delta_i ~ U(1 - eps_i, 1 + eps_i)^d``,
``eps_i = ||R[i] - R[j*]|| / (2 ||R[i]||)`` with ``j*`` the nearest other row (the noise keeps a
proxy inside its own cluster), and fed through every expert's input projection ``W_g^j`` (the
gate projection of a SwiGLU expert; the up projection of a GELU expert). With
``M[i, j] = || R~[i] W_g^j ||_2`` (an ``n x n`` matrix of activation norms) the loss enforces

    (1) expert j responds to its own proxy more than to any other:  M[i, j] <= alpha * M[j, j]
    (2) proxy i activates its own expert more than any other:       M[i, j] <= alpha * M[i, i]

as hinges, averaged over the ``n^2`` entries:

    L_ERC = 1/n^2 * sum_{i != j} [ relu(M[i, j] - alpha M[j, j]) + relu(M[i, j] - alpha M[i, i]) ].

``alpha in [0, 1]`` sets how strict the coupling (hence expert specialisation) is. The cost is n^2
proxy activations, independent of the batch size. The perturbed proxies are used only for the
loss; routing uses the clean ``R``.

Recorded choices: the noise is drawn fresh in every call (``noise=False`` disables it, for
tests); ``eps_i`` is detached (a bound, not a learning signal); default ``alpha=0.5`` and loss
coefficient ``erc_coef=0.01`` of the router option (the paper tunes both).

As a router option: ``router="erc"`` is the softmax top-k router (GShard-style weights) whose
``forward_layer`` (the MoE layer's seam) dispatches normally and adds ``erc_coef * L_ERC`` to
``aux_losses["erc"]`` -- the loss needs the layer's experts, which only the seam provides.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import dispatch_via_layer, layer_experts, softmax_topk
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


def erc_activation_norms(router_weight_ED: Tensor, w_in_EFD: Tensor, noise: bool = True,
                         generator: torch.Generator | None = None) -> Tensor:
    """``M[i, j] = || R~[i] W_in^j ||_2`` for perturbed proxies ``R~`` (``[E, E]``)."""
    R = router_weight_ED.float()
    E = R.shape[0]
    if noise and E > 1:
        with torch.no_grad():
            dist_EE = torch.cdist(R, R)
            dist_EE.fill_diagonal_(float("inf"))
            eps_E = dist_EE.min(dim=1).values / (2.0 * R.norm(dim=1).clamp_min(1e-12))
            u = torch.rand(R.shape, generator=generator, device=R.device)
            delta_ED = 1.0 + (2.0 * u - 1.0) * eps_E[:, None]
        R = R * delta_ED
    act_EEF = torch.einsum("id,jfd->ijf", R, w_in_EFD.float())
    return act_EEF.norm(dim=-1)


def erc_loss(router_weight_ED: Tensor, experts, alpha: float = 0.5, noise: bool = True,
             generator: torch.Generator | None = None) -> Tensor:
    """The ERC loss of a router matrix ``[E, D]`` and an ExpertBank (or its ``[E, F, D]`` input
    projection). Zero exactly when both margin constraints hold for every pair."""
    check_range("alpha", alpha, low=0.0, high=1.0)
    if isinstance(experts, Tensor):
        w_in = experts
    else:
        w_in = experts.w_gate_EFD if getattr(experts, "w_gate_EFD", None) is not None else experts.w_up_EFD
    E = router_weight_ED.shape[0]
    if w_in.shape[0] != E or w_in.shape[-1] != router_weight_ED.shape[1]:
        raise MoelabError(
            f"erc_loss: router weight {tuple(router_weight_ED.shape)} and expert input projection "
            f"{tuple(w_in.shape)} do not match (expected [E, D] and [E, F, D])"
        )
    M = erc_activation_norms(router_weight_ED, w_in, noise=noise, generator=generator)
    diag = M.diagonal()
    off = ~torch.eye(E, dtype=torch.bool, device=M.device)
    col = torch.relu(M - alpha * diag[None, :])  # expert j prefers its own proxy
    row = torch.relu(M - alpha * diag[:, None])  # proxy i prefers its own expert
    return ((col + row) * off).sum() / (E * E)


@ROUTERS.register(
    "erc",
    description="softmax top-k router plus the expert-router coupling (ERC) loss on perturbed router rows",
    paper="Lv et al. 2025, Coupling Experts and Routers in Mixture-of-Experts via an Auxiliary Loss",
)
class ERCRouter(Router):
    causal = True

    def __init__(self, cfg: MoEConfig, *, erc_coef: float = 0.01, alpha: float = 0.5) -> None:
        super().__init__(cfg)
        self.erc_coef = float(check_range("router_kwargs.erc_coef", erc_coef, low=0.0))
        self.alpha = float(check_range("router_kwargs.alpha", alpha, low=0.0, high=1.0))
        self.gate = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        logits_TE = check_finite_logits(self.gate(x_TD), "erc")
        idx_TK, w_TK, probs_TE = softmax_topk(logits_TE, self.k, self.selection_bias())
        return RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=logits_TE, probs_TE=probs_TE)

    def forward_layer(self, layer, x_TD: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, RoutingResult]:
        experts = layer_experts(layer, "erc")
        routing = self(x_TD, ctx)
        y_TD, routing = dispatch_via_layer(layer, x_TD, routing, experts)
        if self.training and self.erc_coef > 0:
            loss = self.erc_coef * erc_loss(self.gate.weight_ED, experts, self.alpha)
            routing = replace(routing, aux_losses={**routing.aux_losses, "erc": loss})
        return y_TD, routing
