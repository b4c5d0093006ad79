"""Hash routing: the expert is a fixed function of the token id.

Roller et al. 2021, "Hash Layers For Large Sparse Models" (NeurIPS 2021, arXiv:2106.04426).
No routing parameters, no balance loss, no assignment algorithm: a token id is hashed to an
expert. Variants implemented (``router_kwargs.method``):

* ``"random"``: a fixed random lookup table id -> expert (seeded by ``seed``), the paper's
  "Random Hash".
* ``"balanced"``: the paper's "Balanced assignment": token frequencies are measured on training
  data and tokens are assigned greedily, most frequent first, to the currently least-loaded
  expert (load = summed frequency), which balances the expected load. Fit it with
  ``router.fit_balanced(token_ids)`` (any iterable of id tensors, e.g. the training stream) or
  pass ``token_counts`` (a length-``vocab_size`` list) in router_kwargs. Before fitting, the
  table is the greedy assignment for uniform frequencies (round robin), which balances the
  vocabulary but not the data.
* ``k > 1`` is the paper's MultiHash: k independent hash functions (k tables; ``balanced``
  uses the fitted table shifted by a fixed random permutation of the experts for hashes 2..k).
  If hash j collides with an expert already chosen by hashes 1..j-1 the next expert (mod E) is
  taken, so a token's k experts are distinct. The paper splits one FFN's hidden units into k
  segments each picked by one hash, whose outputs *sum*; moelab sums k experts (combine weight
  1 each), the same computation when each expert is one segment.

* ``"bigram"``: the paper's Bigram Hash, a fixed random hash of the pair (previous token id,
  current token id) -- ``(a * prev + b * id + c) mod p mod E`` with fixed random a, b, c and a
  large prime p (one triple per hash for k > 1). The first token of each sequence of
  ``ctx.batch_shape`` (or of the whole batch without one) uses previous id 0, or
  ``ctx.prev_token_ids_B`` when the sequences continue cached ones (generation). Causal.

The paper also studies position, clustered (k-means) and "dispersed" hashes and finds them no
better than random/balanced hashing of the current token; they are not included.

Token ids larger than ``vocab_size`` are reduced modulo ``vocab_size`` (documented hashing).
``probs_TE`` is the (fixed) routing distribution: ``1/k`` on each chosen expert (no gradient).
The router needs ``ctx.token_ids_T`` and raises a MoelabError naming it when absent.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_choice, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import require_token_ids, valid_mask
from moelab.layers.routers.base import ROUTERS, Router
from moelab.layers.routing import RoutingContext, RoutingResult


_BIGRAM_PRIME = 2_147_483_647  # 2^31 - 1


def greedy_balanced_table(counts_V: Tensor, num_experts: int) -> Tensor:
    """Most frequent token first, each to the expert with the least summed frequency so far."""
    counts = counts_V.double().cpu()
    order = torch.argsort(counts, descending=True, stable=True)
    table = torch.empty(counts.numel(), dtype=torch.long)
    heap = [(0.0, e) for e in range(num_experts)]
    heapq.heapify(heap)
    for v in order.tolist():
        l, e = heapq.heappop(heap)
        table[v] = e
        l += float(counts[v])
        heapq.heappush(heap, (l, e))
    return table


@ROUTERS.register(
    "hash",
    description="Hash layers: expert = fixed hash of the token id (random, frequency-balanced, bigram; MultiHash for k>1)",
    paper="Roller et al. 2021, Hash Layers For Large Sparse Models",
)
class HashRouter(Router):
    causal = True
    supports_aux_free = False
    needs_token_ids = True

    def __init__(self, cfg: MoEConfig, *, method: str = "random", vocab_size: int = 65536, seed: int = 0,
                 token_counts: list[float] | None = None) -> None:
        super().__init__(cfg)
        self.method = check_choice("router_kwargs.method", method, ["random", "balanced", "bigram"])
        self.vocab_size = int(check_range("router_kwargs.vocab_size", vocab_size, low=1))
        if cfg.k > cfg.num_experts:
            raise MoelabError(f"k={cfg.k} must be <= num_experts={cfg.num_experts} for router 'hash'")
        self.num_experts, self.k = cfg.num_experts, cfg.k
        g = torch.Generator().manual_seed(int(seed))
        E, V, K = cfg.num_experts, self.vocab_size, cfg.k
        self.register_buffer("shift_KE", torch.stack([torch.randperm(E, generator=g) for _ in range(K)]))
        self.shift_KE[0] = torch.arange(E)
        if self.method in ("random", "bigram"):
            tables = torch.randint(0, E, (K, V), generator=g)
        else:
            counts = torch.ones(V) if token_counts is None else torch.as_tensor(token_counts, dtype=torch.float64)
            if counts.numel() != V:
                raise MoelabError(f"token_counts has {counts.numel()} entries, expected vocab_size={V}")
            tables = self._balanced_tables(counts)
        self.register_buffer("table_KV", tables)
        # bigram hash coefficients (a, b, c) per hash function, fixed at construction
        self.register_buffer("bigram_K3", torch.randint(1, _BIGRAM_PRIME, (K, 3), generator=g))

    def _balanced_tables(self, counts_V: Tensor) -> Tensor:
        base = greedy_balanced_table(counts_V, self.num_experts)
        return torch.stack([self.shift_KE[j][base] for j in range(self.k)])

    def fit_balanced(self, token_ids: Iterable[Tensor] | Tensor) -> Tensor:
        """Measure token frequencies on ``token_ids`` and rebuild the balanced tables. Returns counts."""
        if isinstance(token_ids, Tensor):
            token_ids = [token_ids]
        counts = torch.zeros(self.vocab_size, dtype=torch.float64)
        for ids in token_ids:
            counts += torch.bincount(ids.reshape(-1).long() % self.vocab_size, minlength=self.vocab_size).double()
        self.method = "balanced"
        self.table_KV.copy_(self._balanced_tables(counts).to(self.table_KV.device))
        return counts

    def experts_for_ids(self, ids_T: Tensor, prev_T: Tensor | None = None) -> Tensor:
        """``[T, K]`` distinct experts of each token id (pure function of the id, or of the pair
        (previous id, id) for ``method="bigram"``)."""
        ids = ids_T.long() % self.vocab_size
        E = self.num_experts
        cols = []
        for j in range(self.k):
            if self.method == "bigram":
                a, b, c = (int(v) for v in self.bigram_K3[j])
                prev = torch.zeros_like(ids) if prev_T is None else prev_T.long() % self.vocab_size
                e = ((a * prev + b * ids + c) % _BIGRAM_PRIME) % E
            else:
                e = self.table_KV[j][ids]
            while cols:  # resolve MultiHash collisions: next expert (mod E) until distinct
                clash = torch.stack([e == p for p in cols]).any(0)
                if not bool(clash.any()):
                    break
                e = torch.where(clash, (e + 1) % E, e)
            cols.append(e)
        return torch.stack(cols, dim=1)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        T = self.check_input(x_TD).shape[0]
        ids = require_token_ids(ctx, "hash", T).to(x_TD.device)
        prev = None
        if self.method == "bigram":
            B, L = ctx.batch_shape if ctx.batch_shape is not None else (1, T)
            first_B1 = ids.new_zeros(B, 1) if ctx.prev_token_ids_B is None else ctx.prev_token_ids_B.view(B, 1).to(ids)
            prev = torch.cat([first_B1, ids.view(B, L)[:, :-1]], dim=1).reshape(-1)
        idx_TK = self.experts_for_ids(ids, prev)
        weights_TK = torch.ones(T, self.k, device=x_TD.device, dtype=torch.float32)
        probs_TE = torch.zeros(T, self.num_experts, device=x_TD.device).scatter_(1, idx_TK, 1.0 / self.k)
        valid = None if ctx is None or ctx.valid_T is None else valid_mask(ctx, T, x_TD.device)
        return RoutingResult.from_topk(idx_TK, weights_TK, self.num_experts, probs_TE=probs_TE, valid_T=valid)
