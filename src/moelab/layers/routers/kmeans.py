"""Parameter-free online K-Means router.

Ahrac, Hochwald & Geva 2026, "Routers Learn the Geometry of Their Experts: Geometric Coupling in
Sparse Mixture-of-Experts" (arXiv:2605.12476). The paper shows that a router row and its expert
accumulate the same routed-token history, and demonstrates it with a router that has no learned
parameters: each expert keeps a running average ``c_e`` of the hidden states routed to it, and a
token goes to the top-k experts by cosine similarity ``cos(x, c_e)``; after the assignment each
centroid is updated with the tokens it received (an online K-Means / MacQueen step). The paper
reports the lowest load imbalance of the compared balancing schemes at a modest perplexity cost.

Choices (documented; the abstract says "running average" without fixing its form):
* ``update="cumulative"`` (default): the exact running mean of every hidden state ever routed to
  the expert, ``c_e <- c_e + (s_e - n_e c_e) / (N_e + n_e)`` with ``n_e, s_e`` the count and sum
  of this batch's tokens and ``N_e`` the count so far (MacQueen's k-means). ``update="ema"`` uses
  ``c_e <- d c_e + (1 - d) mean_e`` (``decay`` d, default 0.99) so that centroids track drifting
  hidden states; an expert's first update copies its batch mean in both modes.
* Raw (un-normalised) fp32 hidden states are averaged; assignment uses cosine, so only the
  centroid's direction matters. Centroids start as random Gaussian directions (replaced by the
  first batch mean of the tokens they win).
* A token routed to k experts updates all k centroids. Padding tokens are routed but never update
  a centroid; updates happen only in training (``self.training`` with grad enabled, the rule of
  moelab's other per-step accumulators; once per micro-batch), under ``no_grad``, after
  the decision (all tokens of a batch are routed with the same, pre-update centroids, so the
  router is causal).
* Combine weights: softmax of ``cos / temperature`` over the chosen k (default temperature 1.0);
  ``probs_TE`` is the softmax over all experts. There are no logits (parameter-free), so z-loss
  does not apply; balance losses from the layer do not reach it (nothing to train) and are
  normally set to ``aux_loss="none"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.errors import check_choice, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo1_common import cosine_TE, ctx_valid_or_none, valid_T
from moelab.layers.routers.base import ROUTERS, Router
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "kmeans",
    description="parameter-free: top-k cosine to per-expert running means of routed hidden states (online k-means)",
    paper="Ahrac, Hochwald & Geva 2026, Routers Learn the Geometry of Their Experts (arXiv:2605.12476)",
)
class KMeansRouter(Router):
    """router_kwargs: ``update`` ("cumulative" | "ema"), ``decay`` (0.99, ema only),
    ``temperature`` (1.0)."""

    causal = True
    supports_aux_free = False  # the paper balances through geometry alone

    def __init__(self, cfg: MoEConfig, *, update: str = "cumulative", decay: float = 0.99,
                 temperature: float = 1.0) -> None:
        super().__init__(cfg)
        E = cfg.num_experts
        self.update = check_choice("router_kwargs.update", update, ("cumulative", "ema"))
        self.decay = float(check_range("router_kwargs.decay", decay, low=0.0, high=1.0, high_inclusive=False))
        self.temperature = float(check_range("router_kwargs.temperature", temperature, low=0.0, low_inclusive=False))
        self.register_buffer("centroids_ED", torch.randn(E, cfg.d_model))
        self.register_buffer("counts_E", torch.zeros(E, dtype=torch.long))  # integer: exact, never cast

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        T = x_TD.shape[0]
        x32_TD = x_TD.detach().float()
        cos_TE = cosine_TE(x32_TD, self.centroids_ED)
        cos_TK, idx_TK = cos_TE.topk(self.k, dim=-1)
        weights_TK = (cos_TK / self.temperature).softmax(-1)
        probs_TE = (cos_TE / self.temperature).softmax(-1)
        if self.training and torch.is_grad_enabled():
            self._update(x32_TD, idx_TK, valid_T(ctx, T, x_TD.device))
        return RoutingResult.from_topk(
            idx_TK, weights_TK, self.num_experts, logits_TE=None, probs_TE=probs_TE,
            valid_T=ctx_valid_or_none(ctx), causal=True,
        )

    @torch.no_grad()
    def update_centroids(self, x_TD: Tensor, idx_TK: Tensor, valid: Tensor) -> None:
        """One online k-means step from routed tokens (public for analysis and tests)."""
        self._update(x_TD.float(), idx_TK, valid)

    @torch.no_grad()
    def _update(self, x_TD: Tensor, idx_TK: Tensor, valid: Tensor) -> None:
        E, K = self.num_experts, idx_TK.shape[1]
        keep_T = valid.bool()
        if not bool(keep_T.any()):
            return
        idx_S = idx_TK[keep_T].reshape(-1)
        x_SD = x_TD[keep_T].repeat_interleave(K, dim=0)
        n_E = torch.bincount(idx_S, minlength=E)
        c_ED = self.centroids_ED.float()
        sum_ED = torch.zeros_like(c_ED).index_add_(0, idx_S, x_SD.float())
        hit = n_E > 0
        first = hit & (self.counts_E == 0)
        mean_ED = sum_ED / n_E.clamp_min(1).float()[:, None]
        if self.update == "cumulative":
            total_E = (self.counts_E + n_E).clamp_min(1).double()
            step_ED = (sum_ED - n_E.float()[:, None] * c_ED) / total_E.float()[:, None]
            c_ED = torch.where(hit[:, None], c_ED + step_ED, c_ED)
        else:
            c_ED = torch.where(hit[:, None], self.decay * c_ED + (1 - self.decay) * mean_ED, c_ED)
            c_ED = torch.where(first[:, None], mean_ED, c_ED)
        self.centroids_ED.copy_(c_ED)
        self.counts_E += n_E
