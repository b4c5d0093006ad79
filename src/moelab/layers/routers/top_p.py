"""Top-p (dynamic) routing: as many experts as the router's confidence requires.

Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(arXiv:2403.07652, code: ZhenweiAn/Dynamic_MoE); the same Top-P selection is used by
UniMoE-Audio (2025, "Unified Speech and Music Generation with Dynamic-Capacity MoE").

For each token, ``P = softmax(W_r x)``; sort ``P`` descending and activate the smallest prefix whose
cumulative probability reaches the threshold ``p``. Confident tokens use one expert, uncertain ones
more. Because a flat distribution would let the router "buy" more experts, the paper adds a
*dynamic loss*: the entropy of ``P``, minimised, ``L_d = -sum_i P_i log P_i``.

Choices (documented, following the paper's released code where the text is silent):
* Combine weights are the selected softmax probabilities, **not renormalised** (as in the paper's
  ``top_p_sampling_batched_all_sequence``: the kept ``P`` values multiply the expert outputs).
* The expert that makes the cumulative sum cross ``p`` is included ("reaches p"); at least one
  expert is always used.
* ``max_k`` caps the number of experts per token (default: no cap, as in the paper).
* Defaults ``p = 0.4`` and dynamic-loss coefficient ``1e-4`` are the paper's settings as we read
  them; the load-balance loss is the usual one of ``moelab.layers.balancing`` (the paper keeps a
  Switch-style balance loss alongside the dynamic loss).
* The dynamic loss averages the per-token entropy over real (non-padding) tokens and goes to
  ``RoutingResult.aux_losses["dynamic_entropy"]`` already multiplied by its coefficient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.errors import check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo1_common import (
    check_int,
    ctx_valid_or_none,
    entropy_T,
    masked_mean,
    valid_T,
)
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


def top_p_mask_TE(probs_TE: Tensor, p: float, max_k: int) -> Tensor:
    """Bool ``[T, E]``: the smallest prefix of the sorted probabilities whose sum reaches ``p``.

    An expert is kept when the probability mass ranked *before* it is still below ``p`` (so the
    crossing expert is kept) and its rank is below ``max_k``.
    """
    sorted_TE, order_TE = probs_TE.sort(dim=-1, descending=True)
    mass_before_TE = sorted_TE.cumsum(-1) - sorted_TE
    rank_E = torch.arange(probs_TE.shape[-1], device=probs_TE.device)
    keep_sorted_TE = (mass_before_TE < p) & (rank_E < max_k)
    keep_sorted_TE[:, 0] = True
    return torch.zeros_like(keep_sorted_TE).scatter(-1, order_TE, keep_sorted_TE)


@ROUTERS.register(
    "top_p",
    description="smallest set of experts whose softmax mass reaches p (variable k) + entropy (dynamic) loss",
    paper="Huang et al. 2024, Harder Tasks Need More Experts: Dynamic Routing in MoE Models (arXiv:2403.07652)",
)
class TopPRouter(Router):
    """Top-p routing with the paper's dynamic (entropy) loss.

    router_kwargs: ``p`` (threshold in (0, 1], default 0.4), ``max_k`` (cap on experts per token,
    default E), ``entropy_coef`` (dynamic-loss coefficient, default 1e-4).
    """

    causal = True
    supports_aux_free = False  # the selection is a probability-mass threshold, not a ranking to bias

    def __init__(self, cfg: MoEConfig, *, p: float = 0.4, max_k: int | None = None,
                 entropy_coef: float = 1e-4) -> None:
        super().__init__(cfg)
        E = cfg.num_experts
        self.p = float(check_range("router_kwargs.p", p, low=0.0, high=1.0, low_inclusive=False))
        self.max_k = check_int("router_kwargs.max_k", E if max_k is None else max_k, 1, E)
        self.entropy_coef = float(check_range("router_kwargs.entropy_coef", entropy_coef, low=0.0))
        self.gate = GateLinear(cfg.d_model, E, cfg.init_std)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        T = x_TD.shape[0]
        logits_TE = check_finite_logits(self.gate(x_TD), "top_p")
        probs_TE = logits_TE.softmax(-1)
        mask_TE = top_p_mask_TE(probs_TE.detach(), self.p, self.max_k)
        valid = valid_T(ctx, T, x_TD.device)
        aux = {}
        if self.entropy_coef > 0:
            aux["dynamic_entropy"] = self.entropy_coef * masked_mean(entropy_T(probs_TE), valid)
        return RoutingResult.from_mask(
            mask_TE, probs_TE, logits_TE=logits_TE, probs_TE=probs_TE, k=None,
            valid_T=ctx_valid_or_none(ctx), aux_losses=aux, causal=True,
        )
