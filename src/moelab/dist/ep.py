"""Expert parallelism: routed experts sharded over the EP group, tokens moved by all-to-all.

Shape legend: T local tokens, D model dim, E experts (global), El = E/ep local experts, S routed
slots of the local tokens, R rows received by this rank, P ep ranks.

The dispatch follows the all-to-all token dispatchers of torchtitan (``AllToAllTokenDispatcher``)
and Megatron-LM (``MoEAlltoAllTokenDispatcher``), written from their description:

1. sort this rank's kept slots by expert (stable), gather their token rows (``x_SD``);
2. exchange the per-expert counts (a plain ``all_to_all_single`` of ``E`` integers, equal splits), so
   every rank knows how many rows it receives from each source for each of its local experts;
3. send the rows with the autograd ``torch.distributed.nn.functional.all_to_all_single`` and the
   unequal splits of step 2;
4. run the local experts on the received rows with the layer's own dispatch backend (``grouped``
   by default: it permutes rows to expert-major order internally, runs one grouped GEMM and
   un-permutes), every received row being a "token" with one slot of weight 1;
5. send the outputs back with the reverse all-to-all (splits swapped);
6. combine on the source rank: ``y_TD[token] += weight * row`` (the router's weights never leave
   their rank, so the router's gradient is computed where the router lives).

The router, shared experts, balancing and statistics run locally on each rank's tokens, unchanged:
the wrapper replaces only ``layer.dispatch`` (and ``layer.experts`` by the local shard). Routers
that need whole sequences or cross-layer state work as they are, because every rank holds whole
sequences (the batch is split by rows) and ``ctx.state`` is the rank's own forward pass:
``expert_choice`` (per sequence by default; with ``per_sequence=False`` it chooses over the rank's
local batch), ``aux_loss="sequence"``, ``recurrent`` (RMoE's GRU state in ``ctx.state``),
Omni-Router shared routers/decisions (``layout.router_sharing`` with a per-layer bank), ``hash`` and
``stablemoe`` (token ids from the context), ``chain_of_experts`` (calls ``layer.dispatch`` per
iteration). Capacity drops (``capacity_factor``) are decided per rank on its own tokens, as in
Megatron-LM and GShard.

Refused (:func:`check_ep_supported`), with the reason:
- ``smear`` merges the weights of all E experts per sequence (needs every expert on every rank);
- ``competesmoe`` runs every expert on every token during competition;
- ``erc`` adds a loss over every expert's input projection;
- shared expert layouts (UniPool ``shared_pool``, ``rexmoe``): one bank is shared by several layers
  through windows (``PooledExperts``), so a layer does not own a bank to shard.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from moelab.dist.groups import ParallelState, guarded
from moelab.errors import MoelabError
from moelab.layers.dispatch import pick_dispatcher
from moelab.layers.experts import ExpertBank
from moelab.layers.routing import RoutingResult

EP_REFUSED_ROUTERS = {
    "smear": "SMEAR merges the weights of all experts per sequence, so every rank would need every expert",
    "competesmoe": "CompeteSMoE runs every expert on every token during competition (no token dispatch)",
    "erc": "ERC's loss reads every expert's input projection, which EP spreads over ranks",
}
EP_REFUSED_LAYOUTS = {
    "shared_pool": "UniPool's shared pool is one expert bank shared by several layers through windows "
                   "(PooledExperts); EP shards a layer's own bank",
    "rexmoe": "ReXMoE layers reuse the experts of neighbouring layers through windows (PooledExperts); "
              "EP shards a layer's own bank",
}


class CommStats:
    """Bytes and seconds of the token all-to-alls (both directions, forward only) since ``reset``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = 0  # bytes this rank put on the wire (its dispatch rows + the combine rows it returns)
        self.token_bytes = 0  # bytes its own tokens moved: dispatch out + combine back (comm_model.slot_bytes)
        self.bytes_local = 0  # rows that stayed on this rank, times row bytes
        self.rows_dispatched = 0  # routed (kept) slots of this rank's tokens
        self.seconds = 0.0  # whole EP dispatch (collectives + local experts), forward
        self.comm_seconds = 0.0  # the collectives alone (counts + both token all-to-alls), forward
        self.calls = 0


COMM = CommStats()


def _count_bytes(splits: list[int], me: int, row_bytes: int) -> None:
    COMM.bytes_sent += sum(n for r, n in enumerate(splits) if r != me) * row_bytes
    COMM.bytes_local += splits[me] * row_bytes


class EPDispatcher:
    """``layer.dispatch`` under EP: ``(x_TD, routing) -> y_TD`` with the experts spread over ``group``."""

    def __init__(self, layer: nn.Module, state: ParallelState) -> None:
        self.layer = layer
        self.group = state.ep_group
        self.ep, self.me = state.ep, state.ep_rank
        self.num_experts = layer.cfg.num_experts
        self.num_local = self.num_experts // self.ep
        name = layer.cfg.dispatch
        self.backend = pick_dispatcher("auto" if name == "capacity" else name)

    def __call__(self, x_TD: Tensor, routing: RoutingResult) -> Tensor:
        t0 = time.perf_counter()
        r = routing.kept()
        order_S = torch.argsort(r.expert_S, stable=True)
        token_S, expert_S, weight_S = r.token_S[order_S], r.expert_S[order_S], r.weight_S[order_S]
        send_counts_E = torch.bincount(expert_S, minlength=self.num_experts)
        recv_counts_PL = self._exchange_counts(send_counts_E)
        send_splits = send_counts_E.view(self.ep, self.num_local).sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()
        x_RD = self._all_to_all(x_TD[token_S], recv_splits, send_splits)
        y_RD = self._local_experts(x_RD, recv_counts_PL)
        y_SD = self._all_to_all(y_RD, send_splits, recv_splits)
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        _count_bytes(send_splits, self.me, row_bytes)
        _count_bytes(recv_splits, self.me, row_bytes)  # the outputs travel back
        COMM.token_bytes += 2 * (sum(send_splits) - send_splits[self.me]) * row_bytes
        COMM.rows_dispatched += int(token_S.numel())
        COMM.calls += 1
        COMM.seconds += time.perf_counter() - t0
        y_SD = y_SD * weight_S[:, None].to(y_SD.dtype)
        return x_TD.new_zeros(x_TD.shape).index_add(0, token_S, y_SD.to(x_TD.dtype))

    def _exchange_counts(self, send_counts_E: Tensor) -> Tensor:
        recv = torch.empty_like(send_counts_E)
        t0 = time.perf_counter()
        with guarded("ep token counts all_to_all"):
            dist.all_to_all_single(recv, send_counts_E, group=self.group)
        COMM.comm_seconds += time.perf_counter() - t0
        return recv.view(self.ep, self.num_local)  # [source rank, local expert]

    def _all_to_all(self, x_ND: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        out = x_ND.new_empty(sum(out_splits), x_ND.shape[1])
        t0 = time.perf_counter()
        with guarded("ep token all_to_all"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the autograd a2a the issue asks for
            y = dist_fn.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=self.group)
        COMM.comm_seconds += time.perf_counter() - t0
        return y

    def _local_experts(self, x_RD: Tensor, recv_counts_PL: Tensor) -> Tensor:
        R = x_RD.shape[0]
        experts = self.layer.experts
        if R == 0:  # keep the graph connected so the backward all-to-all runs on every rank
            return x_RD + 0.0 * sum(p.sum() for p in experts.parameters())
        local_e = torch.arange(self.num_local, device=x_RD.device).repeat(self.ep)
        expert_R = torch.repeat_interleave(local_e, recv_counts_PL.reshape(-1))
        rows = RoutingResult(token_S=torch.arange(R, device=x_RD.device), expert_S=expert_R,
                             weight_S=x_RD.new_ones(R), num_tokens=R, num_experts=self.num_local, k=1)
        return self.backend(x_RD, rows, experts)


# --------------------------------------------------------------------------- installing EP on a model
def check_ep_supported(model: nn.Module, ep: int) -> None:
    """Raise MoelabError naming the router or layout that cannot run under ``ep > 1``, and why."""
    if ep == 1:
        return
    cfg = getattr(model, "cfg", None)
    kind = getattr(getattr(cfg, "layout", None), "kind", "per_layer")
    if kind in EP_REFUSED_LAYOUTS:
        raise MoelabError(f"parallel.ep={ep} is not supported with layout.kind={kind!r}: {EP_REFUSED_LAYOUTS[kind]}; "
                          "use parallel.ep=1 (data parallel) with this layout")
    for i, layer in _moe_layers(model):
        name = layer.cfg.router
        if name in EP_REFUSED_ROUTERS:
            raise MoelabError(f"parallel.ep={ep} is not supported with moe.router={name!r} (layer {i}): "
                              f"{EP_REFUSED_ROUTERS[name]}; use parallel.ep=1 with this router")
        if not isinstance(layer.experts, ExpertBank):
            raise MoelabError(f"parallel.ep={ep}: layer {i} has experts of type {type(layer.experts).__name__}, "
                              "not an ExpertBank it owns; EP shards a layer's own bank")
        if layer.cfg.num_experts % ep:
            raise MoelabError(f"parallel.ep={ep} does not divide num_experts={layer.cfg.num_experts} of layer {i}; "
                              "choose a divisor")


def _moe_layers(model: nn.Module) -> list[tuple[int, Any]]:
    from moelab.models.moe_protocol import moe_layers

    return [(s.index, s.layer) for s in moe_layers(model)]


def shard_bank(bank: ExpertBank, ep: int, ep_rank: int) -> ExpertBank:
    """A new ExpertBank holding experts ``[ep_rank*E/ep, (ep_rank+1)*E/ep)`` of ``bank`` (copied)."""
    n = bank.num_experts // ep
    lo = ep_rank * n
    local = ExpertBank.__new__(ExpertBank)
    nn.Module.__init__(local)
    for attr in ("d_ff", "d_model", "activation", "gated", "init_std", "down_std"):
        setattr(local, attr, getattr(bank, attr))
    local.num_experts = n
    for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
        w = getattr(bank, name)
        setattr(local, name, None if w is None else nn.Parameter(w.detach()[lo:lo + n].clone()))
    local.ep_offset = lo
    local.ep_global_experts = bank.num_experts
    return local


def install_ep(model: nn.Module, state: ParallelState) -> nn.Module:
    """Shard every MoE layer's experts over ``state.ep_group`` and route its tokens with all-to-all.

    Call on a model built identically on every rank (same seed): each rank keeps its slice of the
    full bank, so the sharded model is the single-process model. No-op for ``ep == 1``.
    """
    check_ep_supported(model, state.ep)
    if state.ep == 1:
        return model
    for _, layer in _moe_layers(model):
        layer.experts = shard_bank(layer.experts, state.ep, state.ep_rank)
        layer.dispatch = EPDispatcher(layer, state)
    return model


def expert_param_names(model: nn.Module) -> set[str]:
    out = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertBank) and hasattr(mod, "ep_offset"):
            out |= {f"{mod_name}.{n}" for n, _ in mod.named_parameters()}
    return out
