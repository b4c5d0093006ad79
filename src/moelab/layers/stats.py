"""Per-layer routing statistics (the per-layer entries of ``metrics.jsonl``).

fairseq's gate metadata (drop fraction, entropy, unused experts) plus the load coefficient of
variation; every value is a plain Python number or list, and padding tokens (``valid_T`` False)
are excluded everywhere.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moelab.layers.routing import RoutingResult

STAT_KEYS = (
    "counts", "load_max_over_mean", "load_cv", "dropped_frac", "router_entropy",
    "experts_per_token", "experts_per_token_hist", "unused_experts", "bias_norm",
)


@torch.compiler.disable  # host-side bookkeeping: compiled, its float results would recompile every step
@torch.no_grad()
def routing_stats(routing: RoutingResult) -> dict[str, Any]:
    """Load, drop, entropy and experts-per-token statistics of one routing decision.

    - ``counts``: kept slots per expert from real tokens; ``load_max_over_mean`` = max/mean and
      ``load_cv`` = std/mean (population std) of ``counts`` (0.0 when nothing was routed).
    - ``dropped_frac``: dropped / routed slots of real tokens.
    - ``router_entropy``: mean over real tokens of the entropy (nats) of ``probs_TE`` normalised to
      sum 1 per token (``nan`` when the router has no probabilities).
    - ``experts_per_token`` (mean) and ``experts_per_token_hist`` (entry j = number of real tokens
      with j kept experts, up to the maximum) over real tokens.
    - ``unused_experts``: experts with no kept slot; ``bias_norm``: L2 norm of ``selection_bias_E``.
    """
    counts_E = routing.counts_E().cpu()
    c = counts_E.double()
    mean = float(c.mean()) if c.numel() else 0.0
    if mean > 0:
        max_over_mean = float(c.max()) / mean
        cv = float(c.std(unbiased=False)) / mean
    else:
        max_over_mean = cv = 0.0
    valid_T = routing.valid_T
    ept_T = routing.experts_per_token_T()
    if valid_T is not None:
        ept_T = ept_T[valid_T.to(ept_T.device)]
    ept_T = ept_T.cpu()
    if ept_T.numel():
        ept_mean = float(ept_T.double().mean())
        hist = torch.bincount(ept_T).tolist()
    else:
        ept_mean, hist = 0.0, []
    entropy = math.nan
    if routing.probs_TE is not None:
        p = routing.probs_TE.detach().double()
        if valid_T is not None:
            p = p[valid_T.to(p.device)]
        if p.shape[0]:
            p = p.clamp_min(0)
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
            ent_T = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
            entropy = float(ent_T.mean())
        else:
            entropy = 0.0
    bias = routing.selection_bias_E
    return {
        "counts": [int(v) for v in counts_E.tolist()],
        "load_max_over_mean": max_over_mean,
        "load_cv": cv,
        "dropped_frac": float(routing.dropped_fraction()),
        "router_entropy": entropy,
        "experts_per_token": ept_mean,
        "experts_per_token_hist": [int(v) for v in hist],
        "unused_experts": int((counts_E == 0).sum()),
        "bias_norm": 0.0 if bias is None else float(bias.detach().double().norm()),
    }
