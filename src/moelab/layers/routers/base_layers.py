"""BASE layers: balanced linear assignment of tokens to experts.

Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models" (ICML 2021,
arXiv:2103.16716). In training, token-to-expert allocation solves a linear assignment problem
that maximises the total affinity ``sum_t h_t . w_{a_t}`` subject to every expert receiving the
same number of tokens, so compute is balanced by construction (no auxiliary loss, no capacity
drops). At test time each token goes greedily to its highest-affinity expert. The expert output
is mixed with a sigmoid gate plus a residual, ``h_t + sigmoid(h_t . w_{a_t}) f_{a_t}(h_t)``.

Implementation choices (recorded):
* Solver (``balanced_assignment``): up to ``EXACT_MAX_TOKENS`` tokens the exact
  ``scipy.optimize.linear_sum_assignment`` on a replicated cost matrix (one column per expert
  *slot*); beyond, the paper's auction algorithm as fairseq ships it (``_fairseq_auction``, eps =
  score range / 50), whose eps-optimal result (0.15-0.2% below the optimum at T=512, E=8) is then
  made optimal by canceling negative exchange cycles between experts (``_cancel_negative_cycles``):
  the same objective as the exact solver (tested against it), ~10-20 ms instead of ~0.15-0.45 s at
  T=512, E=8 (``benchmarks/base_assignment.py``). With T real tokens and E experts every expert
  gets ``floor(T/E)`` tokens and ``T mod E`` of them one more (the solver picks which): loads
  are exactly ``T/E`` when E divides T, otherwise they differ by at most one. Padding tokens are
  excluded from the assignment (greedy top-1). The solve runs on CPU.
* The paper solves the assignment over all workers' tokens; moelab solves it over the tokens of
  one forward (the whole local batch).
* Gate and residual: the router returns combine weight ``sigmoid(h_t . w_e)``; moelab's blocks
  already add the residual around the MoE layer, so ``block output = h + sigmoid(h.w) f(h)``,
  which is the paper's mixing (with pre-norm the router and expert see ``norm(h)``). No
  ``forward_layer`` seam is needed.
* ``k > 1`` (an extension; BASE is top-1): k successive balanced assignments, each excluding the
  experts a token already has, so every round -- and hence the total -- is balanced. (In tiny
  batches, e.g. T < E, the two constraints can conflict; a token left with only forbidden
  slots then takes its best remaining expert, so loads may differ by more than one there.)
* Gradients: the assignment is discrete; the router weights learn through the sigmoid gate,
  exactly as in the paper.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from moelab.errors import MoelabError, check_choice
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import valid_mask
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


EXACT_MAX_TOKENS = 128  # up to this many tokens the exact solver is used (cheap there; O(T^3) beyond)


def balanced_assignment(scores_TE: np.ndarray, method: str = "auto") -> np.ndarray:
    """Expert per token maximising the total score with loads ``floor(T/E)`` or ``+1``.

    ``scores_TE`` may contain ``-inf`` for forbidden pairs (treated as a very large cost).
    ``method``: ``"exact"`` (Hungarian, ``exact_balanced_assignment``), ``"auction"`` (fairseq's
    auction, then negative-cycle canceling: ``auction_balanced_assignment``) or ``"auto"``
    (exact up to ``EXACT_MAX_TOKENS`` tokens, auction beyond).
    """
    check_choice("method", method, ("auto", "exact", "auction"))
    if method == "exact" or (method == "auto" and scores_TE.shape[0] <= EXACT_MAX_TOKENS):
        return exact_balanced_assignment(scores_TE)
    return auction_balanced_assignment(scores_TE)


def exact_balanced_assignment(scores_TE: np.ndarray) -> np.ndarray:
    """The exact balanced assignment (``scipy.optimize.linear_sum_assignment``; O(T^3)); the oracle."""
    T, E = scores_TE.shape
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    s = np.asarray(scores_TE, dtype=np.float64)
    finite = s[np.isfinite(s)]
    span = float(finite.max() - finite.min()) if finite.size else 0.0
    forbidden = (span + 1.0) * (T + 2) * 4.0
    s = np.where(np.isfinite(s), s, -forbidden)
    base, extra = divmod(T, E)
    cols = [s] * base  # slot j*E + e belongs to expert e
    if extra:
        cols.append(s - (span + 1.0) * 2.0)  # overflow slots: used only when regular ones are full
    cost = -np.concatenate(cols, axis=1)
    rows, slot = linear_sum_assignment(cost)
    expert = np.empty(T, dtype=np.int64)
    expert[rows] = slot % E
    return expert


def auction_balanced_assignment(scores_TE: np.ndarray) -> np.ndarray:
    """The balanced assignment by fairseq's auction, made optimal by negative-cycle canceling.

    1. ``_fairseq_auction``: fairseq's BASE-layer auction (``fairseq/clib/libbase/balanced_assignment.cpp``,
       after Bertsekas 1992 and bkj/auction-lap): experts bid for tokens, ``eps = (max - min) / 50``. Its
       result is balanced but only eps-optimal (measured 0.15-0.2% below the optimum at T=512, E=8).
    2. ``_cancel_negative_cycles``: an assignment with fixed loads is optimal iff the exchange graph
       between experts has no negative cycle (edge a->b: the cheapest move of a token from a to b;
       the standard optimality condition of the transportation problem). Moving one token along each
       edge of a negative cycle keeps every load and raises the total; repeated until none is left,
       the result is optimal (ties aside), i.e. the exact solver's objective.
    T not divisible by E: the auction runs with ``floor(T/E) + 1`` slots per expert and one dummy
    token per expert that gets no extra token (fixed at first); a virtual node in the exchange graph
    then lets the extra tokens move to whichever experts give the best total.
    """
    T, E = scores_TE.shape
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    s = np.asarray(scores_TE, dtype=np.float64)
    finite = s[np.isfinite(s)]
    lo, span = (float(finite.min()), float(finite.max() - finite.min())) if finite.size else (0.0, 0.0)
    s = np.where(np.isfinite(s), s, lo - (span + 1.0) * (T + 2) * 4.0)
    base, extra = divmod(T, E)
    n_dummy = (E - extra) % E
    if n_dummy:  # dummy d sits on expert d: above every real score there, far below elsewhere
        dummy = np.full((n_dummy, E), lo - (span + 1.0) * (T + 2) * 4.0)
        dummy[np.arange(n_dummy), np.arange(n_dummy)] = lo + 2.0 * span + 1.0
        s_aux = np.concatenate([s, dummy])
    else:
        s_aux = s
    expert = _fairseq_auction(s_aux, span)[:T]
    return _cancel_negative_cycles(s, expert, base)


def _fairseq_auction(s_TE: np.ndarray, span: float, max_iterations: int = 100) -> np.ndarray:
    """fairseq's ``balanced_assignment`` (T divisible by E): each expert bids for its top ``T/E`` tokens by
    value (score - price) by the value gap to its next token + eps; each token goes to its highest bid."""
    s_ET = torch.from_numpy(np.ascontiguousarray(s_TE.T))
    E, T = s_ET.shape
    C = T // E
    eps = max(span / 50.0, 1e-4)
    cost_T = s_ET.new_zeros(T)
    value_ET = s_ET.clone()
    max_value = float(s_ET.max())
    jobs_T = torch.arange(T)
    won = None
    for it in itertools.count():
        top_v, top_i = torch.topk(value_ET, min(C + 1, T), dim=1)
        inc_EC = (top_v[:, :C] - top_v[:, -1:] if C < T else torch.zeros_like(top_v)) + eps
        bids_ET = s_ET.new_zeros(E, T).scatter_(1, top_i[:, :C], inc_EC)
        if 0 < it < max_iterations:
            bids_ET.view(-1)[won] = eps  # a minimal bid keeps last round's tokens unless outbid
        high_T, bidder_T = bids_ET.max(0)
        have_T = high_T > 0
        if bool(have_T.all()):
            break
        cost_T += high_T  # popular tokens get more expensive
        value_ET = s_ET - cost_T
        won = (bidder_T * T + jobs_T)[have_T]
        # the winner keeps its tokens in its top-C next round (after max_iterations: true values)
        value_ET.view(-1)[won] = max_value if it < max_iterations else s_ET.view(-1)[won]
    expert = np.empty(T, dtype=np.int64)
    expert[top_i[:, :C].reshape(-1).numpy()] = np.repeat(np.arange(E), C)
    return expert


def _exchange_graph(loss_TE: np.ndarray, expert: np.ndarray, base: int) -> np.ndarray:
    """Edge weights ``w[a, b]`` = cheapest loss of moving one of expert a's tokens to expert b
    (``loss_TE[t, b] = s[t, a(t)] - s[t, b]``); node E is virtual: ``E -> a`` free if a holds an
    extra token, ``b -> E`` free if b holds none (T not divisible by E)."""
    T, E = loss_TE.shape
    w = np.full((E + 1, E + 1), np.inf)
    loads = np.bincount(expert, minlength=E)
    starts = np.concatenate([[0], np.cumsum(loads)[:-1]])
    held = loads > 0
    w[:E, :E][held] = np.minimum.reduceat(loss_TE[np.argsort(expert, kind="stable")], starts[held], axis=0)
    np.fill_diagonal(w, np.inf)
    if T % E:
        w[E, :E] = np.where(loads == base + 1, 0.0, np.inf)
        w[:E, E] = np.where(loads == base, 0.0, np.inf)
    return w


def _negative_cycle(w: np.ndarray, tol: float) -> list[int] | None:
    """A cycle of total weight < -tol (node list), or None: Bellman-Ford from a virtual source."""
    n = w.shape[0]
    dist = np.zeros(n)
    parent = np.full(n, -1)
    for _ in range(n + 1):
        cand = dist[:, None] + w  # [u, v]
        u_best = cand.argmin(0)
        improved = cand[u_best, np.arange(n)] < dist - tol
        if not improved.any():
            return None
        dist = np.where(improved, cand[u_best, np.arange(n)], dist)
        parent = np.where(improved, u_best, parent)
    v = int(np.flatnonzero(improved)[0])
    for _ in range(n):  # walk back into the cycle
        v = int(parent[v])
    cycle, u = [v], int(parent[v])
    while u != v:
        cycle.append(u)
        u = int(parent[u])
    cycle.reverse()  # cycle[i] -> cycle[i + 1]
    total = sum(w[cycle[i], cycle[(i + 1) % len(cycle)]] for i in range(len(cycle)))
    return cycle if total < -tol else None


def _cancel_negative_cycles(s: np.ndarray, expert: np.ndarray, base: int, max_cycles: int = 100_000) -> np.ndarray:
    """Move tokens along negative exchange cycles until none is left (see auction_balanced_assignment)."""
    T, E = s.shape
    expert = expert.copy()
    tol = 1e-9 * max(1.0, float(np.abs(s).max()))
    for _ in range(max_cycles):
        loss_TE = s[np.arange(T), expert][:, None] - s
        cycle = _negative_cycle(_exchange_graph(loss_TE, expert, base), tol)
        if cycle is None:
            break
        moves = []
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            if a < E and b < E:  # the virtual node moves nothing
                rows = np.flatnonzero(expert == a)
                moves.append((rows[loss_TE[rows, b].argmin()], b))
        for t, b in moves:
            expert[t] = b
    return expert


@ROUTERS.register(
    "base",
    description="BASE layers: exactly balanced linear assignment in training, greedy top-1 at eval, sigmoid gate",
    paper="Lewis et al. 2021, BASE Layers: Simplifying Training of Large, Sparse Models",
)
class BaseLayerRouter(Router):
    causal = False  # training: the balanced assignment couples every token of the batch
    causal_eval = True  # eval: greedy top-1 per token
    supports_aux_free = False  # the training assignment depends on every token of the batch

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        if cfg.k > cfg.num_experts:
            raise MoelabError(f"k={cfg.k} must be <= num_experts={cfg.num_experts} for router 'base'")
        self.num_experts, self.k = cfg.num_experts, cfg.k
        self.gate = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        T = x_TD.shape[0]
        x_TD = self.check_input(x_TD)
        logits_TE = check_finite_logits(self.gate(x_TD), "base")
        idx_TK = torch.topk(logits_TE.detach(), self.k, dim=-1).indices  # greedy (eval, padding)
        valid = valid_mask(ctx, T, x_TD.device)
        balanced = self.training and bool(valid.any())
        if balanced:
            rows = valid.nonzero(as_tuple=True)[0]
            s = logits_TE.detach()[rows].cpu().numpy().astype(np.float64)
            chosen = np.zeros((rows.numel(), self.k), dtype=np.int64)
            for j in range(self.k):
                e = balanced_assignment(s)
                bad = ~np.isfinite(s[np.arange(len(e)), e])
                if bad.any():  # tiny batches: balance and distinctness can conflict; repair greedily
                    e[bad] = s[bad].argmax(axis=1)
                chosen[:, j] = e
                s[np.arange(len(e)), e] = -np.inf  # a token never gets the same expert twice
            idx_TK = idx_TK.clone()
            idx_TK[rows] = torch.from_numpy(chosen).to(idx_TK.device)
        weights_TK = torch.sigmoid(logits_TE.gather(1, idx_TK))
        return RoutingResult.from_topk(
            idx_TK, weights_TK, self.num_experts, logits_TE=logits_TE,
            probs_TE=torch.softmax(logits_TE, dim=-1),
            valid_T=None if ctx is None or ctx.valid_T is None else valid, causal=not balanced,
        )
