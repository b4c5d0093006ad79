"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", section 3.1).

Shape legend: T tokens, D model dim, E experts, B groups (sequences), L tokens per group, C capacity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_choice, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult


def expert_capacity(n_tokens: int, capacity_factor: float, num_experts: int) -> int:
    """The paper's per-expert capacity ``C = n * c / E``, rounded up, at least 1 and at most n."""
    return max(1, min(n_tokens, math.ceil(n_tokens * capacity_factor / num_experts - 1e-9)))


EVAL_ROUTING = ("token_choice", "expert_choice")


@ROUTERS.register(
    "expert_choice",
    description="each expert picks its top-C tokens (balanced by construction; not causal)",
    paper="Zhou et al. 2022, Mixture-of-Experts with Expert Choice Routing (arXiv 2202.09368)",
)
class ExpertChoiceRouter(Router):
    """Experts choose tokens: ``S = softmax(X W_g)`` over experts, then each expert takes the ``C``
    tokens with the highest affinity, ``G, I = TopK(S^T, C)``; combine weights are those ``S`` entries.

    Capacity ``C = n * c / E`` (rounded up) for a group of ``n`` real tokens with capacity factor
    ``c`` (``capacity_factor``, default ``cfg.k``, so tokens get k experts on average). A token may get
    0..E experts, so the result has ``k=None``.

    **Causality caveat.** Whether token t is chosen depends on the affinities of every token in its
    group, later positions included: the router leaks the future and is not valid for
    autoregressive training/generation as is (the paper evaluates on encoder-decoder / fine-tuning
    setups). Training-mode results carry ``causal=False``.

    **Causal inference mode** (``eval_routing``, router_kwargs). ``"token_choice"`` (default): in
    eval mode each token takes the top-``k_eval`` experts of the *same* affinities ``S`` with the
    same combine weights (the ``S`` entries, not renormalised), ``k_eval = round(capacity_factor)``
    (the average experts per token of training; ``cfg.k`` by default), so evaluation and
    generation are causal. This is a common way to run an expert-choice-trained model
    autoregressively (Zhou et al. 2022 leave decoding open; Raposo et al. 2024,
    Mixture-of-Depths, likewise replace their non-causal top-k by a per-token decision at sampling
    time with a per-token predictor); the train/test mismatch it introduces is the price. ``"expert_choice"``: eval as in
    training (non-causal: evaluation then records ``causal: false`` and ``generate`` refuses).

    **Groups (our choice).** With ``ctx.batch_shape=(B, L)`` and ``per_sequence=True`` each sequence is
    its own group, so a sequence's routing does not depend on the other sequences in the batch
    (batch-composition invariance) and every expert takes C of each sequence's tokens. Otherwise the
    whole T tokens form one group. Padding tokens are never chosen and not counted in ``n``.

    No aux-free bias: balance holds by construction (``supports_aux_free=False``).
    """

    causal = False
    supports_aux_free = False

    def __init__(self, cfg: MoEConfig, *, capacity_factor: float | None = None, per_sequence: bool = True,
                 eval_routing: str = "token_choice") -> None:
        super().__init__(cfg)
        self.eval_routing = check_choice("router_kwargs.eval_routing", eval_routing, EVAL_ROUTING)
        c = float(cfg.k) if capacity_factor is None else capacity_factor
        check_range("capacity_factor", c, low=0.0, low_inclusive=False, high=float(cfg.num_experts))
        self.capacity_factor = c
        self.per_sequence = bool(per_sequence)
        self.gate = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)
        self.k_eval = max(1, min(cfg.num_experts, round(c)))

    def is_causal(self, training: bool | None = None) -> bool:
        mode = self.training if training is None else bool(training)
        return not mode and self.eval_routing == "token_choice"

    def token_choice(self, logits_TE: Tensor, probs_TE: Tensor) -> RoutingResult:
        """The causal inference mode: top-``k_eval`` of the affinities per token, weights ``S``."""
        idx_TK = torch.topk(probs_TE.detach(), self.k_eval, dim=-1).indices
        return RoutingResult.from_topk(idx_TK, probs_TE.gather(1, idx_TK), self.num_experts,
                                       logits_TE=logits_TE, probs_TE=probs_TE)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = check_finite_logits(self.gate(x_TD), "expert_choice")
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.is_causal():
            return self.token_choice(logits_TE, probs_TE)
        if self.per_sequence and ctx is not None and ctx.batch_shape is not None:
            B, L = ctx.batch_shape
            if B * L != T:
                raise MoelabError(f"ctx.batch_shape={ctx.batch_shape} does not match T={T} tokens")
        else:
            B, L = 1, T
        valid_T = None if ctx is None or ctx.valid_T is None else ctx.valid_T.reshape(-1).bool()
        valid_BL = torch.ones(B, L, dtype=torch.bool, device=x_TD.device) if valid_T is None else valid_T.view(B, L)
        mask_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
        if T > 0:
            with torch.no_grad():
                n_B = valid_BL.sum(1)
                cap_B = torch.tensor([expert_capacity(int(n), self.capacity_factor, E) if int(n) else 0
                                      for n in n_B.tolist()], device=x_TD.device)
                c_max = int(cap_B.max())
                if c_max > 0:
                    aff_BEL = probs_TE.detach().view(B, L, E).transpose(1, 2)
                    aff_BEL = aff_BEL.masked_fill(~valid_BL[:, None, :], float("-inf"))
                    pos_BEC = aff_BEL.topk(c_max, dim=-1).indices  # each expert's best tokens
                    rank_C = torch.arange(c_max, device=x_TD.device)
                    keep_BEC = (rank_C[None, None, :] < cap_B[:, None, None]).expand(B, E, c_max)
                    tok_BEC = pos_BEC + (torch.arange(B, device=x_TD.device) * L)[:, None, None]
                    exp_BEC = torch.arange(E, device=x_TD.device)[None, :, None].expand_as(tok_BEC)
                    mask_TE[tok_BEC[keep_BEC], exp_BEC[keep_BEC]] = True
        return RoutingResult.from_mask(mask_TE, probs_TE, logits_TE=logits_TE, probs_TE=probs_TE, k=None,
                                       causal=False)
