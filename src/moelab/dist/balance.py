"""Balancing across data-parallel ranks: N ranks on one global batch equal 1 process on it.

Each statistic that a balance rule reads from "the batch" is summed over the DP group, so it is the
global batch's (Megatron-LM all-reduces ``tokens_per_expert`` over DP for its global aux loss and for
the expert-bias update, ``get_updated_expert_bias``; torchtitan does the same for its load-balancing
bias). What is reduced, and when:

| rule                                   | reduced                                 | when                       |
|----------------------------------------|-----------------------------------------|----------------------------|
| ``aux_loss="switch"`` (micro-batch)     | routed counts ``c_i`` of the micro-batch | every training forward     |
| ``aux_loss="global"`` (optimizer step)  | counts, prob sums, tokens per micro-batch| every training forward     |
| aux-loss-free bias (``AuxFreeBias``)    | the step's load ``load_E``               | once, before the bias step |
| UniPool pool loss (lagged)              | the step's pool counts and tokens        | once, before the roll-over |

Why this is exact: the Switch loss ``E * sum_i f_i P_i`` has its gradient through ``P`` only. With
``f`` from the global counts, rank r's loss ``E * sum_i f_i P_i^r`` averaged over ranks (DDP averages
gradients; every rank has the same number of tokens) has the global loss's value and gradient.

Not reduced (each rank uses its own micro-batch; documented, not global): ``aux_loss="sequence"``
(per-sequence by definition, so already exact), the z-loss (a mean over tokens: exact for equal
shards), losses a router owns (``relu``'s L1 balance, ``null_experts``' loss, Chain-of-Experts'
per-iteration losses, ...), the UniPool ``exact`` pool-loss mode, and batch-coupled routers whose
*decision* couples the tokens of a batch (``expert_choice``, ``base_layers``, ``sinkhorn``, ``bip``):
those decide over each rank's local batch, i.e. DP=N equals N processes on the shards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab.dist.groups import ParallelState, all_reduce_sum
from moelab.layers.balancing import (
    AuxFreeBias,
    GlobalLoadAccumulator,
    normalize_probs,
    routing_counts,
    switch_aux_loss,
)
from moelab.layers.routers.base import Router


class ReducedGlobalLoad(GlobalLoadAccumulator):
    """:class:`GlobalLoadAccumulator` whose per-micro-batch sums are summed over ``group`` first."""

    def __init__(self, num_experts: int, group: Any) -> None:
        super().__init__(num_experts)
        self.group = group

    def _add(self, routing) -> None:
        E = self.count_E.numel()
        p_TE = normalize_probs(routing.probs_TE.detach()).double()
        if routing.valid_T is not None:
            p_TE = p_TE[routing.valid_T]
        packed = torch.cat([routing.routed_counts_E().double(), p_TE.sum(0), p_TE.new_tensor([p_TE.shape[0]])])
        all_reduce_sum(packed, self.group, "global aux-loss counts")
        self.count_E += packed[:E].to(self.count_E)
        self.prob_sum_E += packed[E:2 * E].to(self.prob_sum_E)
        self.tokens += packed[-1].to(self.tokens)


class SwitchBalanceDP:
    """``layer.balance`` for ``aux_loss="switch"``: ``f`` from counts summed over the DP group."""

    def __init__(self, layer: nn.Module, group: Any) -> None:
        self.layer, self.group = layer, group

    def __call__(self, routing, ctx) -> dict[str, Tensor]:
        losses = type(self.layer).balance(self.layer, routing, ctx)
        cfg = self.layer.cfg
        if not (self.layer.training and torch.is_grad_enabled()) or cfg.aux_loss_coef == 0.0:
            return losses
        # swap the layer's micro-batch Switch term for the one with global counts
        valid_T = routing.valid_T if routing.valid_T is not None else (None if ctx is None else ctx.valid_T)
        local_E = routing_counts(routing, valid_T).double()
        global_E = all_reduce_sum(local_E.clone(), self.group, "switch aux-loss counts")
        swap = switch_aux_loss(routing.probs_TE, global_E, valid_T) - switch_aux_loss(routing.probs_TE, local_E, valid_T)
        losses["aux_loss"] = losses["aux_loss"] + cfg.aux_loss_coef * swap
        return losses


def _owns_balance(router: nn.Module) -> bool:
    return type(router).balance_losses is not Router.balance_losses


def install_dp_balance(model: nn.Module, state: ParallelState) -> nn.Module:
    """Make every MoE layer's balancing global over the DP group (see the module docstring)."""
    from moelab.models.moe_protocol import moe_layers

    group = state.dp_group
    if group is None:
        return model
    for site in moe_layers(model):
        layer, router = site.layer, site.layer.router
        if getattr(router, "global_load", None) is not None and not isinstance(router.global_load, ReducedGlobalLoad):
            router.global_load = ReducedGlobalLoad(layer.cfg.num_experts, group)
        if layer.cfg.aux_loss == "switch" and isinstance(router, Router) and not _owns_balance(router):
            layer.balance = SwitchBalanceDP(layer, group)
    return model


def step_buffers(model: nn.Module) -> list[Tensor]:
    """The per-step buffers summed over DP before the optimizer step's balancing updates."""
    from moelab.layers.pool import PoolBalance

    out: list[Tensor] = []
    for m in model.modules():
        if isinstance(m, AuxFreeBias):
            out.append(m.load_E)
        elif isinstance(m, PoolBalance):
            out += [m.count_N, m.tokens]
    return out


def install_step_reduction(optimizer: torch.optim.Optimizer, model: nn.Module, state: ParallelState) -> Any:
    """An optimizer step pre-hook summing :func:`step_buffers` over DP. Register it *before*
    ``install_aux_free_hook`` (pre-hooks run in registration order)."""
    group = state.dp_group

    def _pre_step(opt: Any, args: Any, kwargs: Any) -> None:
        bufs = step_buffers(model)
        if group is None or not bufs:
            return
        flat = torch.cat([b.detach().double().reshape(-1) for b in bufs])
        all_reduce_sum(flat, group, "aux-free bias / pool loads")
        i = 0
        for b in bufs:
            n = b.numel()
            b.copy_(flat[i:i + n].view_as(b).to(b.dtype))
            i += n

    return optimizer.register_step_pre_hook(_pre_step)
