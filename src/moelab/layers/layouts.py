"""How expert capacity is distributed across depth: pure functions for layouts.

* Expert-count schedules over depth (DynaMoE, Gülmez 2026, "DynaMoE: Dynamic Token-Level Expert
  Activation with Layer-Wise Adaptive Capacity"): uniform, ascending, descending, pyramid, wave
  and hourglass (the inverse pyramid). The paper names six schedules; its abstract lists
  descending, ascending, pyramid and wave besides uniform; we add hourglass as the sixth (the
  inverse pyramid), since a schedule set closed under reversal is what the comparison needs.
  Each schedule is a shape ``s_l > 0`` over the L MoE layers; the number of experts per layer is
  ``E_l = round(budget * s_l / sum(s))`` by largest remainder, so the counts sum exactly to the
  budget, and every layer keeps at least ``min_experts`` (>= k).
* The pool-level balance loss of UniPool (Huang et al. 2026, "UniPool: A Globally Shared Expert Pool
  for Mixture-of-Experts"): the Switch form applied to utilisation aggregated over every layer that
  draws from the pool; 1.0 at perfect pool balance, like every balance loss in moelab.
* Closed-form parameter counts of the layouts, used by ``moelab info`` and checked against
  ``sum(p.numel())`` in the tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_choice

SCHEDULES = ("uniform", "ascending", "descending", "pyramid", "hourglass", "wave")


def schedule_shape(kind: str, n_layers: int) -> list[float]:
    """The relative expert capacity ``s_l`` of each of ``n_layers`` MoE layers (all > 0)."""
    check_choice("schedule", kind, SCHEDULES)
    if n_layers < 1:
        raise MoelabError(f"n_layers={n_layers} must be >= 1")
    L = n_layers
    if kind == "uniform":
        return [1.0] * L
    if kind == "ascending":
        return [float(l + 1) for l in range(L)]
    if kind == "descending":
        return [float(L - l) for l in range(L)]
    if kind == "pyramid":  # peak in the middle
        return [float(min(l + 1, L - l)) for l in range(L)]
    if kind == "hourglass":  # widest at both ends
        mid = [min(l + 1, L - l) for l in range(L)]
        return [float(max(mid) + 1 - m) for m in mid]
    # wave: one period of a cosine over depth, between 0.5 and 1.5 of the mean
    return [1.0 + 0.5 * math.cos(2 * math.pi * l / L) for l in range(L)]


def expert_schedule(kind: str, n_layers: int, budget: int, *, min_experts: int = 1) -> list[int]:
    """Experts per MoE layer following ``kind``, summing exactly to ``budget``.

    Raises if the budget cannot give every layer ``min_experts`` (set it to k: a layer with
    fewer than k experts cannot route).
    """
    if budget < n_layers * min_experts:
        raise MoelabError(
            f"expert budget={budget} does not fit {n_layers} layers with at least "
            f"min_experts={min_experts} each (needs >= {n_layers * min_experts})"
        )
    shape = schedule_shape(kind, n_layers)
    # Reserve the minimum, distribute the rest proportionally (largest remainder).
    free = budget - n_layers * min_experts
    total = sum(shape)
    raw = [free * s / total for s in shape]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(n_layers), key=lambda l: (raw[l] - counts[l], -l), reverse=True)
    for l in order[: free - sum(counts)]:
        counts[l] += 1
    return [c + min_experts for c in counts]


def pool_balance_loss(counts_P: Tensor, probs_sum_P: Tensor, num_tokens: int, k: int) -> Tensor:
    """UniPool's pool-level auxiliary loss, normalised to 1.0 at perfect pool balance.

    ``counts_P``: routed slots per pool expert summed over every layer using the pool;
    ``probs_sum_P``: router probabilities per pool expert summed over those layers' real tokens;
    ``num_tokens``: the number of (layer, token) pairs summed over (T_total). With
    ``f_j = counts_j / (k T_total)`` and ``p_j = probs_sum_j / T_total`` the loss is
    ``P * sum_j f_j p_j`` — the Switch loss of the pool as a whole. A pool whose experts are
    starved across layers scores > 1 even when each layer alone looks balanced over its own
    subset.
    """
    P = counts_P.numel()
    if num_tokens <= 0:
        return probs_sum_P.sum() * 0.0
    f = counts_P.to(probs_sum_P.dtype) / (k * num_tokens)
    p = probs_sum_P / num_tokens
    return P * (f * p).sum()


def expert_params(d_model: int, d_ff: int, activation: str = "swiglu") -> int:
    """Parameters of one expert: SwiGLU has gate, up and down projections; GELU up and down."""
    check_choice("activation", activation, ("swiglu", "gelu"))
    return (3 if activation == "swiglu" else 2) * d_model * d_ff
