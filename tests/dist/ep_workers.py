"""Functions run on each rank by ``moelab.dist.launch.spawn`` (loaded from this file in the children).

Each worker computes its oracle itself: the single-process layer/model on the whole global batch,
built from the same seed, with no collective. The distributed result is compared against it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelab.dist.balance import install_dp_balance
from moelab.dist.comm_model import slot_bytes
from moelab.dist.ep import COMM, install_ep
from moelab.dist.groups import init_parallel
from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoELayer

T_LOCAL, D = 12, 16


def _skewed_inputs(world: int, cfg: MoEConfig, layer: MoELayer, hot: float) -> torch.Tensor:
    """Global batch with a shared direction u; router row 0 points along u (hot expert), the last row
    against it (an expert that receives no token)."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(D, generator=g)
    x = 0.3 * torch.randn(world * T_LOCAL, D, generator=g) + u
    gate = [p for n, p in layer.router.named_parameters() if p.dim() == 2 and p.shape[1] == D][0]
    with torch.no_grad():
        gate[0] += hot * u / u.norm()
        gate[cfg.num_experts - 1] -= 5.0 * u / u.norm()
    return x


def _grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}


def layer_equivalence(rank: int, world: int, cases: list[dict]) -> None:
    for case in cases:
        case = dict(case)
        hot = case.pop("hot", 2.0)
        cfg = MoEConfig(d_model=D, **case)
        torch.manual_seed(0)
        ref = MoELayer(cfg)
        x_full = _skewed_inputs(world, cfg, ref, hot)
        g_full = torch.randn(x_full.shape, generator=torch.Generator().manual_seed(2))
        # oracle: one process, whole batch
        xr = x_full.clone().requires_grad_(True)
        (ref(xr) * g_full).sum().backward()
        y_ref = ref(x_full.clone()).detach()
        counts = ref.last_stats["counts"]
        assert counts[-1] == 0 and sum(c > 0 for c in counts) >= 2 and len(set(counts)) > 2, counts  # uneven, one empty
        ref_grads = _grads(ref)
        # EP: the same layer, sharded; this rank's slice of the batch
        torch.manual_seed(0)
        layer = MoELayer(cfg)
        _skewed_inputs(world, cfg, layer, hot)
        state = init_parallel(ep=world, num_experts=cfg.num_experts)
        install_ep(layer_as_model(layer), state)
        install_dp_balance(layer_as_model(layer), state)
        layer.aux_loss_scale = 1.0 / world  # DDP would average; here we sum the ranks' gradients
        sl = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
        x = x_full[sl].clone().requires_grad_(True)
        COMM.reset()
        y = layer(x)
        owner_E = torch.arange(cfg.num_experts) // (cfg.num_experts // world)
        kept = layer.last_routing.kept()
        assert COMM.token_bytes == slot_bytes(kept.expert_S, owner_E, rank, D, 4) > 0  # the bytes model
        (y * g_full[sl]).sum().backward()
        torch.testing.assert_close(y.detach(), y_ref[sl], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, xr.grad[sl], rtol=1e-5, atol=1e-6)
        _check_param_grads(layer, ref_grads, state, cfg)


def layer_as_model(layer: MoELayer) -> torch.nn.Module:
    m = torch.nn.Module()
    m.moe = layer
    return m


def _check_param_grads(layer: MoELayer, ref_grads: dict, state, cfg: MoEConfig) -> None:
    lo = layer.experts.ep_offset
    n = cfg.num_experts // state.ep
    names = {n_ for n_, p in layer.named_parameters() if p.grad is not None}
    assert names == set(ref_grads), (names, set(ref_grads))
    for name, p in layer.named_parameters():
        g = p.grad.detach().clone()
        if name.startswith("experts."):
            want = ref_grads[name][lo:lo + n]  # the shard's slice; already summed over ranks by the all-to-all
        else:
            dist.all_reduce(g)  # replicated parameters: the ranks' contributions add up
            want = ref_grads[name]
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def dying_peer(rank: int, world: int, out: str) -> None:
    """Rank 1 dies before the collective; rank 0 must fail with PeerFailure, not hang."""
    import os
    import time

    from moelab.dist.groups import PeerFailure, all_reduce_sum

    if rank == 1:
        os._exit(0)  # no clean shutdown: the process just disappears
    t0 = time.perf_counter()
    try:
        all_reduce_sum(torch.ones(3), dist.group.WORLD, "test all-reduce")
        msg = "no error"
    except PeerFailure as e:
        msg = f"PeerFailure: {e}"
    with open(out, "w") as f:
        f.write(f"{time.perf_counter() - t0:.2f}\n{msg}\n")
    os._exit(0)
