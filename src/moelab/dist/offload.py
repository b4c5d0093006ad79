"""Expert offloading simulator: an on-device expert cache over a routing trace (inference).

Tokens are replayed in order (sequence by sequence, position by position) through the traced MoE
layers; at each (token, layer) the kept experts must be on the device. The cache holds
``cache_experts`` (layer, expert) entries shared by all layers; a miss fetches the expert
(``expert_bytes``). Eviction: ``lru`` (least recently used) or ``lfu`` (least frequently used,
ties -> least recent).

Prefetching (before layer l+1 runs for a token, its predicted experts are fetched if absent; a
prefetch that is then not used is wasted bytes):
- ``expertflow``: ExpertFlow's routing-path predictor (He et al. 2024, "ExpertFlow: Optimized Expert
  Activation and Token Allocation for Efficient Mixture-of-Experts Inference"), here as first-order
  transition statistics ``P(e' at l+1 | e at l)`` fitted on the first half of the trace's sequences
  (the second half is replayed); the predicted set is the top-k of the summed transitions;
- ``pregate``: Read-ME's pre-gating (Cai et al. 2024, "Read-ME: Refactorizing LLMs as Router-Decoupled
  MoE with System Co-Design"): the next layer's router applied ahead of time to the current layer's
  input (``hidden_TD`` of layer l with ``router_w_ED`` of layer l+1; a linear-router approximation);
- ``none``.
Reported: hit rate of demanded experts, bytes moved per token (fetches + prefetches), prefetch
precision, and the trace's consecutive-token overlap and segment cache best hit rate (SCH; Liang et
al. 2025, "Not All Models Suit Expert Offloading") of the first layer, the offline bound the cache
policies are measured against.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from moelab.errors import MoelabError, check_choice

POLICIES = ("lru", "lfu")
PREDICTORS = ("none", "expertflow", "pregate")


class ExpertCache:
    """A cache of (layer, expert) keys with LRU or LFU eviction."""

    def __init__(self, size: int, policy: str) -> None:
        check_choice("policy", policy, POLICIES)
        if size < 1:
            raise MoelabError(f"cache_experts={size} is out of range; expected cache_experts >= 1")
        self.size, self.policy = size, policy
        self.entries: OrderedDict[tuple[int, int], int] = OrderedDict()  # key -> use count; order = recency

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.entries

    def touch(self, key: tuple[int, int]) -> None:
        self.entries[key] = self.entries.get(key, 0) + 1
        self.entries.move_to_end(key)

    def insert(self, key: tuple[int, int]) -> None:
        if key in self.entries:
            return
        if len(self.entries) >= self.size:
            self._evict()
        self.entries[key] = 0

    def _evict(self) -> None:
        if self.policy == "lru":
            self.entries.popitem(last=False)
            return
        victim = min(self.entries, key=lambda k: self.entries[k])  # first = least recent among ties
        del self.entries[victim]


@dataclass
class OffloadResult:
    hit_rate: float
    bytes_per_token: float
    prefetch_precision: float | None
    demands: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sets_per_layer(trace: Any) -> list[list[list[int]]]:
    T = trace.num_tokens
    out = []
    for lt in trace.layers:
        t, e, _ = lt.kept()
        sets: list[list[int]] = [[] for _ in range(T)]
        for ti, ei in zip(t.tolist(), e.tolist()):
            sets[ti].append(ei)
        out.append(sets)
    return out


def _order(trace: Any, tokens: np.ndarray) -> np.ndarray:
    keys = np.lexsort((trace.pos_T[tokens], trace.seq_T[tokens]))
    return tokens[keys]


def expertflow_transitions(trace: Any, sets: list[list[list[int]]], tokens: np.ndarray) -> list[np.ndarray]:
    """Per layer l: counts ``[E_l, E_{l+1}]`` of experts chosen at l+1 after experts at l (fit tokens)."""
    mats = []
    for li in range(len(sets) - 1):
        m = np.zeros((trace.layers[li].num_experts, trace.layers[li + 1].num_experts))
        for t in tokens.tolist():
            for a in sets[li][t]:
                for b in sets[li + 1][t]:
                    m[a, b] += 1
        mats.append(m)
    return mats


def _predict(kind: str, trace: Any, sets, mats, li: int, t: int, k: int) -> list[int]:
    if kind == "expertflow":
        score = sum((mats[li][a] for a in sets[li][t]), np.zeros(mats[li].shape[1]))
    else:  # pregate
        nxt, cur = trace.layers[li + 1], trace.layers[li]
        if cur.hidden_TD is None or nxt.router_w_ED is None:
            raise MoelabError("predict='pregate' needs hidden_TD and router_w_ED in the trace")
        score = nxt.router_w_ED @ cur.hidden_TD[t]
    return [int(i) for i in np.argsort(-score, kind="stable")[:k]]


def simulate(trace: Any, cache_experts: int, *, policy: str = "lru", predict: str = "none",
             expert_bytes: int = 1, prefetch_k: int | None = None) -> OffloadResult:
    """Replay the second half of the trace's sequences (the first half fits ``expertflow``)."""
    check_choice("predict", predict, PREDICTORS)
    sets = _sets_per_layer(trace)
    tokens = np.flatnonzero(trace.valid_T)
    seqs = np.unique(trace.seq_T[tokens])
    fit_seqs = set(seqs[: len(seqs) // 2].tolist())
    fit = np.array([t for t in tokens if int(trace.seq_T[t]) in fit_seqs], dtype=np.int64)
    run = _order(trace, np.array([t for t in tokens if int(trace.seq_T[t]) not in fit_seqs], dtype=np.int64))
    mats = expertflow_transitions(trace, sets, fit) if predict == "expertflow" else None
    cache = ExpertCache(cache_experts, policy)
    hits = demands = moved = useful = prefetched = 0
    pending: set[tuple[int, int]] = set()
    for t in run.tolist():
        for li in range(len(sets)):
            for e in sets[li][t]:
                key = (li, e)
                demands += 1
                if key in cache:
                    hits += 1
                    useful += key in pending
                else:
                    cache.insert(key)
                    moved += 1
                pending.discard(key)
                cache.touch(key)
            if predict != "none" and li + 1 < len(sets):
                k = prefetch_k or max(1, len(sets[li + 1][t]) or 1)
                for e in _predict(predict, trace, sets, mats, li, t, k):
                    key = (li + 1, e)
                    if key not in cache:
                        cache.insert(key)
                        pending.add(key)
                        moved += 1
                        prefetched += 1
    n = max(1, run.size)
    return OffloadResult(hits / max(1, demands), moved * expert_bytes / n,
                         None if predict == "none" else useful / max(1, prefetched), demands, int(run.size))


def segment_metrics(trace: Any, cache_experts: int) -> dict[str, float]:
    """The trace's consecutive-token overlap and SCH (first traced layer), from moelab.analysis.metrics."""
    from moelab.analysis import metrics as M

    lt = trace.layers[0]
    mask = lt.mask_TE(trace.num_tokens)[trace.valid_T]
    seq = trace.seq_T[trace.valid_T]
    per_layer_cache = min(lt.num_experts, max(1, cache_experts // len(trace.layers)))
    return {"consecutive_overlap": float(M.consecutive_token_overlap(mask, seq)),
            "sch": float(M.segment_cache_best_hit_rate(mask, seq, per_layer_cache))}
