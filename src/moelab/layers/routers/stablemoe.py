"""StableMoE: learn a balanced routing, distil it into a light router, then freeze it.

Dai et al. 2022, "StableMoE: Stable Routing Strategy for Mixture of Experts" (ACL 2022,
arXiv:2204.08396). Learning-to-route suffers from *routing fluctuation* (a token's expert keeps
changing during training although only one is used at inference). Two stages:

Stage 1 (steps ``< stage1_steps``): the backbone router scores ``s_{t,e} = h_t . c_e`` (expert
centroids ``c``), each token goes to its top expert ``a_t`` and the output is gated by
``sigmoid(s_{t,a_t})``. A balance loss

    L_bal = alpha * sum_e ((|A_e| - n/E) / (n/E)) * sum_{t in A_e} sigmoid(s_{t,e})

pushes scores of over-loaded experts down and of under-loaded ones up (``A_e`` the tokens routed
to e). At the same time the routing is distilled into a lightweight router decoupled from the
backbone -- a word embedding of the token id and its own centroids, ``d_{t,e} = emb(x_t) . c'_e``
-- with a cross-entropy loss towards the stage-1 assignment ``a_t`` (no gradient reaches the
backbone through it).

Stage 2 (steps ``>= stage1_steps``): the distilled router is frozen (evaluated without
gradient) and alone decides the assignment ``a_t = argmax_e d_{t,e}``, so routing never changes
again; the gate ``sigmoid(s_{t,a_t})`` still uses the (trained) backbone centroids. No balance or
distillation loss.

As in the released code (Hunter-DDM/stablemoe, ``fairseq/modules/moe_layer.py``): the distilled
router is a 50-dimensional word embedding (``distill_dim``) with its own centroids, both centroid
matrices are orthogonally initialised with gain 0.1, the distillation target is the (no-grad)
argmax of the backbone affinities, and *evaluation always routes with the distilled router* (in
either stage). Stage 1 routes greedily (top-1 of the backbone scores; the code also offers
balanced-assignment variants).

Choices (recorded): the code's balance loss and distillation loss are sums over tokens; moelab
divides both by the number of real tokens n so that ``balance_alpha`` (default 0.3) and
``distill_coef`` (1.0) do not scale with the batch; ids are reduced modulo ``vocab_size``;
``k > 1`` (StableMoE is top-1) takes the top-k of the respective scores and distils the top-1
expert.
Driving the stages: a ``step`` buffer advances in every training forward with grad enabled
(once per micro-batch; pass ``stage1_steps`` in micro-batches); it is checkpointed, so a resumed
run stays in its stage. ``router.stage`` tells the current stage.
The router needs ``ctx.token_ids_T`` (the distilled router reads token ids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import require_token_ids, valid_mask
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


@ROUTERS.register(
    "stablemoe",
    description="StableMoE: balanced routing distilled into a token-embedding router, then frozen (2 stages)",
    paper="Dai et al. 2022, StableMoE: Stable Routing Strategy for Mixture of Experts",
)
class StableMoERouter(Router):
    causal = True
    supports_aux_free = False
    needs_token_ids = True

    def __init__(self, cfg: MoEConfig, *, stage1_steps: int = 1000, balance_alpha: float = 0.3,
                 distill_coef: float = 1.0, distill_dim: int = 50, vocab_size: int = 65536) -> None:
        super().__init__(cfg)
        self.stage1_steps = int(check_range("router_kwargs.stage1_steps", stage1_steps, low=0))
        self.balance_alpha = float(check_range("router_kwargs.balance_alpha", balance_alpha, low=0.0))
        self.distill_coef = float(check_range("router_kwargs.distill_coef", distill_coef, low=0.0))
        self.vocab_size = int(check_range("router_kwargs.vocab_size", vocab_size, low=1))
        distill_dim = int(check_range("router_kwargs.distill_dim", distill_dim, low=1))
        self.centroids = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)  # backbone router
        self.distill_emb = nn.Embedding(self.vocab_size, distill_dim)
        self.distill_centroids = GateLinear(distill_dim, cfg.num_experts, cfg.init_std)
        with torch.no_grad():  # the released code's init
            nn.init.orthogonal_(self.centroids.weight_ED, gain=0.1)
            nn.init.orthogonal_(self.distill_centroids.weight_ED, gain=0.1)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def stage(self) -> int:
        return 1 if int(self.step) < self.stage1_steps else 2

    def distilled_logits(self, ids_T: Tensor) -> Tensor:
        return self.distill_centroids(self.distill_emb(ids_T % self.vocab_size))

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        T, E = x_TD.shape[0], self.num_experts
        ids = require_token_ids(ctx, "stablemoe", T).to(x_TD.device)
        valid = valid_mask(ctx, T, x_TD.device)
        stage = self.stage
        if self.training and torch.is_grad_enabled():
            self.step += 1
        s_TE = check_finite_logits(self.centroids(x_TD), "stablemoe")
        aux: dict[str, Tensor] = {}
        if stage == 1 and self.training:
            idx_TK = torch.topk(s_TE.detach(), self.k, dim=-1).indices
            vf = valid.float()
            n = vf.sum().clamp_min(1.0)
            a_T = idx_TK[:, 0]
            onehot_TE = F.one_hot(a_T, E).float() * vf[:, None]
            load_E = onehot_TE.sum(0)
            mean_load = n / E
            imbalance_E = (load_E - mean_load) / mean_load
            aux["stablemoe_balance"] = self.balance_alpha * (
                (imbalance_E[None, :] * onehot_TE * torch.sigmoid(s_TE)).sum() / n)
            d_TE = self.distilled_logits(ids)
            ce_T = F.cross_entropy(d_TE, a_T, reduction="none")
            aux["stablemoe_distill"] = self.distill_coef * (ce_T * vf).sum() / n
        else:
            with torch.no_grad():
                d_TE = self.distilled_logits(ids)
            idx_TK = torch.topk(d_TE, self.k, dim=-1).indices
        w_TK = torch.sigmoid(s_TE.gather(1, idx_TK))
        return RoutingResult.from_topk(idx_TK, w_TK, E, logits_TE=s_TE, probs_TE=torch.softmax(s_TE, dim=-1),
                                       aux_losses=aux)
