"""NormRouter: L2-normalised, ReLU-sparsified, scale-stable top-k scores (UniPool).

Huang et al. 2026, "UniPool: A Globally Shared Expert Pool for Mixture-of-Experts"
(arXiv:2605.06665), which adopts NormRouter "to provide sparse and scale-stable routing into the
shared expert pool". Its exact form, from the Megatron-LM implementation used with UniPool's
pool-level auxiliary loss (``NormRouter.routing``):

    logits = W_r x                                     (linear gate, fp32)
    scores = scale * scale_init * ReLU(logits / (||logits||_2 + eps))
    top-k of (scores + expert_bias); combine weights = the selected scores (not renormalised)

``scale`` is a learnable scalar (init 1); ``scale_init`` is 1 (``"one"``) or, with
``"monte_carlo"``, ``E[1 / ||top-k of ReLU(z/||z||)||_2]`` for ``z ~ N(0, I_E)``, which makes the
selected weights' norm about 1 at initialisation. Dividing the logit vector by its norm makes the
scores invariant to the scale of ``x`` (and of ``W_r``): a residual stream whose norm grows with
depth, or layers of different scales sharing one pool, see the same routing; the ReLU makes the
scores sparse.

Choices (documented):
* Slots whose score is exactly 0 (fewer than k positive normalised logits) are not emitted: their
  weight is 0 and the ReLU passes no gradient there, so outputs and gradients are identical to
  keeping them, with less compute. The realised number of experts per token is then <= k
  (``k`` is reported as ``cfg.k`` only when every token kept all k).
* ``probs_TE`` (for balance losses and stats) is the score vector. ``loss_form`` (router_kwargs)
  says how the balance losses (switch, sequence, global) and UniPool's pool-level loss read it:
  ``"unipool"`` (default): as UniPool's code does, the *raw* scores go into Megatron's
  ``switch_load_balancing_loss_func`` form ``E * sum_i c_i / (k T) * sum_t s_ti / T``
  (``balancing.unipool_switch_loss``; not 1.0 at balance), so ``norm_scale`` gets gradient from
  the losses; ``"normalized"``: moelab's form before issue 13, the scores renormalised per token
  (as DeepSeek-V3 does for sigmoid scores) and ``f = c / sum(c)``: 1.0 at balance, and
  ``norm_scale`` cancels out of every loss (its gradient from them is 0 up to rounding).
  Counts are the emitted slots (Megatron also counts a selected slot whose score is exactly 0;
  such slots carry no gradient and occur only when fewer than k normalised logits are positive).
* Aux-free bias (if configured) is added to the scores for selection only, as in Megatron.
* ``eps`` = 1e-9 (Megatron's ``moe_norm_routing_eps`` is configurable; its value is ours).
  ``scale_init="monte_carlo"`` uses 20,000 samples from a fixed-seed generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.errors import check_choice, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo1_common import ctx_valid_or_none
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits, select_topk
from moelab.layers.routing import RoutingContext, RoutingResult


LOSS_FORMS = ("unipool", "normalized")


def monte_carlo_scale(num_experts: int, k: int, samples: int = 20000, seed: int = 42) -> float:
    """``E[1 / ||top-k of ReLU(z / ||z||)||_2]`` for ``z ~ N(0, I_E)`` with some ``z_e > 0``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, num_experts, generator=g, dtype=torch.float64)
    y = torch.relu(z / z.norm(dim=-1, keepdim=True))
    norm = y.topk(k, dim=-1).values.norm(dim=-1)
    # A sample with no positive component has norm 0 (probability 2^-E): the expectation would be
    # infinite, so such samples are left out (Megatron's estimator returns inf for small E).
    return float((1.0 / norm[norm > 0]).mean())


@ROUTERS.register(
    "norm",
    description="NormRouter: ReLU of the L2-normalised logit vector times a learnable scale, top-k (scale-stable)",
    paper="Huang et al. 2026, UniPool: A Globally Shared Expert Pool for Mixture-of-Experts (arXiv:2605.06665)",
)
class NormRouter(Router):
    """router_kwargs: ``scale_init`` ("one" | "monte_carlo"), ``eps`` (1e-9), ``loss_form``
    ("unipool" | "normalized", see the module docstring)."""

    causal = True

    def __init__(self, cfg: MoEConfig, *, scale_init: str = "one", eps: float = 1e-9,
                 loss_form: str = "unipool") -> None:
        super().__init__(cfg)
        check_choice("router_kwargs.scale_init", scale_init, ("one", "monte_carlo"))
        self.loss_form = check_choice("router_kwargs.loss_form", loss_form, LOSS_FORMS)
        self.eps = float(check_range("router_kwargs.eps", eps, low=0.0, low_inclusive=False))
        self.scale_initial = 1.0 if scale_init == "one" else monte_carlo_scale(cfg.num_experts, cfg.k)
        self.gate = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)
        self.norm_scale = torch.nn.Parameter(torch.ones(1))

    def scores(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits_TE, scores_TE)`` in fp32."""
        logits_TE = check_finite_logits(self.gate(x_TD), "norm")
        normed_TE = logits_TE / (logits_TE.norm(dim=-1, keepdim=True) + self.eps)
        return logits_TE, torch.relu(normed_TE) * (self.norm_scale.float() * self.scale_initial)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        logits_TE, scores_TE = self.scores(x_TD)
        idx_TK = select_topk(scores_TE, self.k, self.selection_bias())
        chosen_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, idx_TK, True)
        emitted_TE = chosen_TE & (scores_TE.detach() > 0)
        full = bool(emitted_TE.sum() == emitted_TE.shape[0] * self.k)
        return RoutingResult.from_mask(
            emitted_TE, scores_TE, logits_TE=logits_TE, probs_TE=scores_TE,
            k=self.k if full else None, valid_T=ctx_valid_or_none(ctx), loss_form=self.loss_form,
        )
