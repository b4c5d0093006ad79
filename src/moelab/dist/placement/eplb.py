"""EPLB: DeepSeek's expert-parallel load balancer (redundant experts, hierarchical placement).

DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (section 3.4, redundant experts), and its official
code ``deepseek-ai/EPLB`` (``eplb.py``), whose algorithm this re-implements (same rules, same
tie-breaking, so the README example comes out identical; see tests/dist/test_placement.py).

Shape legend: X layers, L logical experts, P physical expert slots (replicas), G expert groups,
N nodes, R GPUs (ranks).

Three greedy steps per layer (the hierarchical policy, used when N divides G):

1. **groups -> nodes**: the G groups (contiguous blocks of L/G experts) are packed onto N nodes,
   G/N per node, heaviest group first, each to the lightest node that still has room;
2. **replicas within a node**: each node's L/N experts get P/N slots: every extra slot goes to the
   expert with the largest load per replica (``load / replicas``; ties -> lowest index);
3. **replicas -> GPUs**: each node's P/N replicas (load = expert load / its replica count) are packed
   onto its R/N GPUs, P/R per GPU, in the same way as step 1.

When N does not divide G, the global policy runs: steps 2-3 with one group and one node.
Ties in packing go to the lowest pack index; sorting is stable descending by load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelab.errors import MoelabError


@dataclass
class EPLBPlan:
    """``phy2log [X, P]`` (logical expert of each slot; slot s lives on GPU ``s // (P/R)``),
    ``log2phy [X, L, max replicas]`` (slots of each expert, -1 padded), ``logcnt [X, L]``."""

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    num_gpus: int

    def gpu_loads(self, weight_XL: torch.Tensor) -> torch.Tensor:
        """Load per GPU ``[X, R]`` when each expert's load is split evenly over its replicas."""
        w = weight_XL.double()
        per_slot = w.gather(1, self.phy2log) / self.logcnt.gather(1, self.phy2log).double()
        return per_slot.view(w.shape[0], self.num_gpus, -1).sum(-1)


def balanced_packing(weight_n: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Pack n items into ``num_packs`` packs of exactly n/num_packs items, heaviest item first into
    the lightest pack with room (ties -> lowest pack). Returns (pack of item, position in pack)."""
    n = len(weight_n)
    per = n // num_packs
    if per == 1:
        return list(range(n)), [0] * n
    order = sorted(range(n), key=lambda i: -weight_n[i])  # stable: equal loads keep index order
    pack_w, pack_n = [0.0] * num_packs, [0] * num_packs
    pack, pos = [-1] * n, [-1] * n
    for i in order:
        j = min((p for p in range(num_packs) if pack_n[p] < per), key=lambda p: pack_w[p])
        pack[i], pos[i] = j, pack_n[j]
        pack_w[j] += weight_n[i]
        pack_n[j] += 1
    return pack, pos


def replicate(weight_l: list[float], num_slots: int) -> tuple[list[int], list[int], list[int]]:
    """One slot per expert, then each extra slot to the expert with the largest load per replica.
    Returns (expert of each slot, replica index of each slot, replicas per expert)."""
    L = len(weight_l)
    slot_expert, slot_rank, count = list(range(L)), [0] * L, [1] * L
    for _ in range(num_slots - L):
        best = max(range(L), key=lambda e: (weight_l[e] / count[e], -e))
        slot_expert.append(best)
        slot_rank.append(count[best])
        count[best] += 1
    return slot_expert, slot_rank, count


def _check(L: int, P: int, G: int, N: int, R: int) -> None:
    rules = [(L % G == 0, f"num_groups={G} must divide the {L} experts"),
             (G % N == 0, f"num_nodes={N} must divide num_groups={G}"),
             (R % N == 0, f"num_gpus={R} must be a multiple of num_nodes={N}"),
             (P % R == 0, f"num_replicas={P} must be a multiple of num_gpus={R}"),
             (P >= L, f"num_replicas={P} must be >= the {L} experts")]
    for ok, msg in rules:
        if not ok:
            raise MoelabError(f"EPLB: {msg}")


def _layer_hierarchical(w: list[float], P: int, G: int, N: int, R: int) -> tuple[list[int], list[int], list[int]]:
    L = len(w)
    _check(L, P, G, N, R)
    gsize, per_node_log, per_node_phy, gpus_per_node = L // G, L // N, P // N, R // N
    group_w = [sum(w[g * gsize:(g + 1) * gsize]) for g in range(G)]
    gnode, gpos = balanced_packing(group_w, N)
    # node-major order of the logical experts ("middle" ids): node, then group slot, then expert
    mlog2log = [0] * L
    for g in range(G):
        for j in range(gsize):
            mlog2log[(gnode[g] * (G // N) + gpos[g]) * gsize + j] = g * gsize + j
    phy2log, phyrank, logcnt = [0] * P, [0] * P, [0] * L
    for node in range(N):
        mine = mlog2log[node * per_node_log:(node + 1) * per_node_log]
        slot_e, slot_r, cnt = replicate([w[e] for e in mine], per_node_phy)
        slot_w = [w[mine[e]] / cnt[e] for e in slot_e]
        gpu, pos = balanced_packing(slot_w, gpus_per_node)
        per_gpu = per_node_phy // gpus_per_node
        for s in range(per_node_phy):
            final = node * per_node_phy + gpu[s] * per_gpu + pos[s]
            phy2log[final], phyrank[final] = mine[slot_e[s]], slot_r[s]
        for e, c in enumerate(cnt):
            logcnt[mine[e]] = c
    return phy2log, phyrank, logcnt


def rebalance_experts(weight_XL: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> EPLBPlan:
    """Replicate and place experts from their measured loads ``weight_XL`` (e.g. tokens per expert)."""
    if weight_XL.dim() != 2:
        raise MoelabError(f"weight has shape {tuple(weight_XL.shape)}; expected [layers, experts]")
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # the global policy
    rows = [_layer_hierarchical(weight_XL[x].double().tolist(), num_replicas, num_groups, num_nodes, num_gpus)
            for x in range(weight_XL.shape[0])]
    phy2log = torch.tensor([r[0] for r in rows], dtype=torch.long)
    phyrank = torch.tensor([r[1] for r in rows], dtype=torch.long)
    logcnt = torch.tensor([r[2] for r in rows], dtype=torch.long)
    X, L = weight_XL.shape
    log2phy = torch.full((X, L, int(logcnt.max())), -1, dtype=torch.long)
    for x in range(X):
        for s in range(num_replicas):
            log2phy[x, phy2log[x, s], phyrank[x, s]] = s
    return EPLBPlan(phy2log, log2phy, logcnt, num_gpus)
