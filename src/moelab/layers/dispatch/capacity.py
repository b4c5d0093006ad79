"""Capacity-limited (token-dropping) dispatch: GShard / Switch Transformer expert capacity.

Each expert takes at most ``C = ceil(capacity_factor * S / E)`` slots (S = routed slots, T*k for
a fixed k; Lepikhin et al. 2020 "GShard", Fedus et al. 2021 "Switch Transformers"). Which slots
an over-full expert keeps is the drop policy (DeepSpeed's ``drop_policy``):

- ``"probs"``: the slots with the highest combine weight (ties: earlier token first);
- ``"position"``: first come, first served in token order (GShard's position-in-batch priority).

Choices: padding tokens compete after every real token of the same expert (so padding never
displaces real tokens); slots an earlier step already dropped (``keep_S`` False) stay dropped and
take no capacity. ``capacity_factor=inf`` keeps everything. Dropped slots contribute nothing to
the output and are counted through ``routing.keep_S`` (``dropped_fraction``, ``counts_E``).
The ``capacity`` backend then computes the kept slots with the fastest dropless backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_choice
from moelab.layers.routing import RoutingResult

DROP_POLICIES = ("probs", "position")


def expert_capacity(capacity_factor: float, num_slots: int, num_experts: int) -> int:
    """``ceil(capacity_factor * S / E)`` (``S`` when the factor is infinite)."""
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
        raise MoelabError(
            f"capacity_factor={capacity_factor!r} is out of range; expected capacity_factor > 0 "
            "(or None for dropless)"
        )
    if math.isinf(capacity_factor):
        return num_slots
    return int(math.ceil(capacity_factor * num_slots / num_experts))


def apply_capacity(routing: RoutingResult, capacity_factor: float, policy: str = "probs") -> RoutingResult:
    """Return ``routing`` with ``keep_S`` marking the slots that fit in each expert's capacity."""
    check_choice("drop_policy", policy, DROP_POLICIES)
    S, E = routing.num_slots, routing.num_experts
    C = expert_capacity(capacity_factor, S, E)
    dev = routing.expert_S.device
    if S == 0:
        return routing.with_keep(torch.ones(0, dtype=torch.bool, device=dev))
    # Priority inside an expert, least significant key first (stable sorts compose).
    if policy == "probs":
        order_S = torch.sort(routing.weight_S.detach().float(), descending=True, stable=True).indices
    else:
        order_S = torch.arange(S, device=dev)
    flag_S = torch.zeros(S, dtype=torch.long, device=dev)  # 0 real, 1 padding, 2 already dropped
    if routing.valid_T is not None:
        flag_S = flag_S + (~routing.valid_T[routing.token_S]).long()
    if routing.keep_S is not None:
        flag_S = torch.where(routing.keep_S, flag_S, torch.full_like(flag_S, 2))
    key_S = routing.expert_S * 3 + flag_S
    order_S = order_S[torch.sort(key_S[order_S], stable=True).indices]
    counts_E = torch.bincount(routing.expert_S, minlength=E)
    start_E = counts_E.cumsum(0) - counts_E
    e_sorted = routing.expert_S[order_S]
    rank = torch.arange(S, device=dev) - start_E[e_sorted]
    keep_sorted = (rank < C) & (flag_S[order_S] != 2)
    keep_S = torch.empty(S, dtype=torch.bool, device=dev)
    keep_S[order_S] = keep_sorted
    return routing.with_keep(keep_S)


def capacity_dispatch(x_TD: Tensor, routing: RoutingResult, experts) -> Tensor:
    """Compute the kept slots (``routing.keep_S``, set by ``apply_capacity``) dropless."""
    from moelab.layers.dispatch import pick_dispatcher

    return pick_dispatcher("auto", x_TD.device)(x_TD, routing.kept(), experts)
