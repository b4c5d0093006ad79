"""Small helpers shared by the router-zoo-2 routers (no registrations here).

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.errors import MoelabError
from moelab.layers.routing import RoutingContext, RoutingResult


def require_token_ids(ctx: RoutingContext | None, router: str, T: int) -> Tensor:
    """``ctx.token_ids_T`` or a MoelabError naming the router that needs it."""
    ids = None if ctx is None else ctx.token_ids_T
    if ids is None:
        raise MoelabError(
            f"router={router!r} is a function of the token id: it needs ctx.token_ids_T "
            "(a RoutingContext with token_ids_T); got None"
        )
    ids = ids.reshape(-1)
    if ids.numel() != T:
        raise MoelabError(f"ctx.token_ids_T has {ids.numel()} entries, expected T={T}")
    return ids.long()


def valid_mask(ctx: RoutingContext | None, T: int, device: torch.device) -> Tensor:
    v = None if ctx is None else ctx.valid_T
    if v is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    return v.reshape(-1).to(device=device, dtype=torch.bool)


def sinkhorn_knopp(logits_TE: Tensor, n_iters: int = 50, tol: float = 1e-4) -> Tensor:
    """Balanced Sinkhorn normalisation of ``exp(logits)``: rows sum to 1/T, columns to 1/E.

    The form of S-BASE (Clark et al. 2022) as in Megatron-LM's ``sinkhorn``: alternate row and
    column scalings of ``exp(cost)`` until the column scaling changes by less than ``tol``.
    Computed in the log domain (numerically safe for large logits). Differentiable (unrolled).
    """
    T, E = logits_TE.shape
    log_k = logits_TE.float()
    log_a = torch.zeros(T, device=log_k.device)
    log_b = torch.zeros(E, device=log_k.device)
    log_r, log_c = -torch.log(torch.tensor(float(T))), -torch.log(torch.tensor(float(E)))
    for _ in range(n_iters):
        log_a = log_r - torch.logsumexp(log_k + log_b[None, :], dim=1)
        new_b = log_c - torch.logsumexp(log_k + log_a[:, None], dim=0)
        delta = (new_b.detach().exp() - log_b.detach().exp()).abs().mean()
        log_b = new_b
        if float(delta) < tol:
            break
    return torch.exp(log_k + log_a[:, None] + log_b[None, :])


def softmax_topk(logits_TE: Tensor, k: int, bias_E: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """GShard-style gating: ``(idx_TK, weights_TK, probs_TE)``; top-k of the softmax (plus an
    optional selection-only bias), weights = the selected probabilities, renormalised when k > 1
    (k = 1 keeps the raw probability so the router still gets a gradient)."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    with torch.no_grad():
        sel = probs_TE.detach() if bias_E is None else probs_TE.detach() + bias_E.to(probs_TE)
        idx_TK = torch.topk(sel, k, dim=-1).indices
    w_TK = probs_TE.gather(1, idx_TK)
    if k > 1:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    return idx_TK, w_TK, probs_TE


def layer_experts(layer, router: str):
    """The ExpertBank of the MoE layer calling a ``forward_layer`` seam."""
    experts = getattr(layer, "experts", None)
    if experts is None or not hasattr(experts, "w_up_EFD"):
        raise MoelabError(f"router={router!r} needs an MoE layer with an ExpertBank at layer.experts")
    return experts


def dispatch_via_layer(layer, x_TD: Tensor, routing: RoutingResult, experts) -> tuple[Tensor, RoutingResult]:
    """Run ``routing`` through the layer's experts as the layer itself would: capacity drops
    (``cfg.capacity_factor``) first, then the layer's dispatch backend. Returns ``(y_TD, routing)``
    with the routing after drops (what stats should see)."""
    from moelab.layers.dispatch import apply_capacity, pick_dispatcher

    cfg = getattr(layer, "cfg", None)
    cf = getattr(cfg, "capacity_factor", None)
    if cf is not None:
        routing = apply_capacity(routing, cf, cfg.drop_policy)
    fn = getattr(layer, "dispatch_fn", None)  # test doubles may pass a backend directly
    if callable(fn):
        return fn(x_TD, routing, experts), routing
    if hasattr(layer, "dispatch") and getattr(layer, "experts", None) is experts:
        return layer.dispatch(x_TD, routing), routing
    name = getattr(cfg, "dispatch", "auto") if cfg is not None else "auto"
    return pick_dispatcher("auto" if name == "capacity" else name, x_TD.device)(x_TD, routing, experts), routing


def all_experts_TEd(experts, x_TD: Tensor) -> Tensor:
    """Every expert on every token: ``[T, E, D]`` (dense; for competition/oracles)."""
    if experts.w_gate_EFD is None:
        h_TEF = F.gelu(torch.einsum("td,efd->tef", x_TD, experts.w_up_EFD))
    else:
        h_TEF = F.silu(torch.einsum("td,efd->tef", x_TD, experts.w_gate_EFD)) * torch.einsum(
            "td,efd->tef", x_TD, experts.w_up_EFD)
    return torch.einsum("tef,edf->ted", h_TEF, experts.w_down_EDF)
