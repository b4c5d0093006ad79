"""BASE layers: balanced linear assignment of tokens to experts.

Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models" (ICML 2021,
arXiv:2103.16716). In training, token-to-expert allocation solves a linear assignment problem
that maximises the total affinity ``sum_t h_t . w_{a_t}`` subject to every expert receiving the
same number of tokens, so compute is balanced by construction (no auxiliary loss, no capacity
drops). At test time each token goes greedily to its highest-affinity expert. The expert output
is mixed with a sigmoid gate plus a residual, ``h_t + sigmoid(h_t . w_{a_t}) f_{a_t}(h_t)``.

Implementation choices (recorded):
* Exact solver: ``scipy.optimize.linear_sum_assignment`` on a replicated cost matrix (one column
  per expert *slot*) instead of the paper's auction algorithm; both return an optimal balanced
  assignment (ties aside). With T real tokens and E experts every expert gets ``floor(T/E)``
  slots plus one optional overflow slot carrying a penalty larger than the score range, so the
  optimum fills all regular slots first: loads are exactly ``T/E`` when E divides T, otherwise
  they differ by at most one. Padding tokens are excluded from the assignment (greedy top-1).
  The solve runs on CPU (it is O(T^3); fine for moelab's batch sizes, slow for T >> 4096).
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

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import valid_mask
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


def balanced_assignment(scores_TE: np.ndarray) -> np.ndarray:
    """Expert per token maximising the total score with loads ``floor(T/E)`` or ``+1``.

    ``scores_TE`` may contain ``-inf`` for forbidden pairs (treated as a very large cost).
    """
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
