"""Data parallelism: DDP for the replicated parameters, explicit sums for EP-sharded experts.

``wrap_data_parallel`` wraps the model in ``torch.nn.parallel.DistributedDataParallel`` over the
world, telling DDP to ignore the EP-sharded expert parameters (each rank holds other experts, so
averaging them would mix different experts). DDP averages the replicated gradients; every rank's
loss is the mean over its own ``batch/world`` rows, so the average is the global batch's gradient.

Expert gradients need no averaging inside the EP group: the backward all-to-all already delivers,
to the rank owning expert e, the sum over the EP group's tokens. :func:`sync_expert_grads` sums them
over the expert-data-parallel group (replicas of the same shard) and divides by the world size, which
gives the same global-batch mean as DDP's average. (``buffers`` are not broadcast: the balancing
buffers are kept equal by ``moelab.dist.balance``, and per-step accumulators are rank-local until
they are reduced.)

:func:`clip_grad_norm` is the global norm over the full (unsharded) model: replicated gradients
count once, shard norms are summed over the EP group.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.dist.ep import expert_param_names
from moelab.dist.groups import ParallelState, all_reduce_sum, guarded


def wrap_data_parallel(model: nn.Module, state: ParallelState) -> nn.Module:
    """``DistributedDataParallel(model)`` ignoring expert shards; the model itself when ``world == 1``."""
    if state.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = sorted(expert_param_names(model))
    if ignore:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    import warnings

    with guarded("DDP initial broadcast"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers=False is what we mean (see above)
        return DDP(model, process_group=state.dp_group, broadcast_buffers=False, find_unused_parameters=True)


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    names = expert_param_names(model)
    return [p for n, p in model.named_parameters() if n in names]


@torch.no_grad()
def sync_expert_grads(model: nn.Module, state: ParallelState) -> None:
    """Sum expert-shard gradients over the EDP group and divide by the world size (see module doc)."""
    params = [p for p in expert_params(model) if p.grad is not None]
    if not params or state.world == 1:
        return
    if state.edp > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        all_reduce_sum(flat, state.edp_group, "expert gradient sum over EDP")
        i = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[i:i + n].view_as(p.grad))
            i += n
    for p in params:
        p.grad.div_(state.world)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, state: ParallelState) -> float:
    """Clip every gradient by the global norm of the unsharded model; return that norm."""
    if state.world == 1 or state.ep == 1:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    experts = {id(p) for p in expert_params(model)}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    ex_sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None and id(p) in experts:
            ex_sq += p.grad.double().pow(2).sum()
    all_reduce_sum(ex_sq, state.ep_group, "gradient norm over EP")
    rep = sum((p.grad.double().pow(2).sum() for p in model.parameters()
               if p.grad is not None and id(p) not in experts), torch.zeros((), dtype=torch.float64))
    total = float((rep + ex_sq).sqrt())
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
