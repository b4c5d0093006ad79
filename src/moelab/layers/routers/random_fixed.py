"""Non-learned random routers: a frozen random router (SMoE-Dropout) and stochastic experts (THOR).

``mode="frozen"`` -- Chen et al. 2023, "Sparse MoE as the New Dropout: Scaling Dense and
Self-Slimmable Transformers" (SMoE-Dropout, ICLR 2023, arXiv:2303.01610). The router is a
randomly initialised linear gate that is *never trained* (its weight is a buffer: it receives no
gradient and its decisions for a given input never change), and the number of activated experts
grows over training, from ``k_start`` to ``k_end`` (default all E experts), which makes the model
"self-slimmable": any k can be used at inference. Schedule: ``k(step) = k_start +
floor((k_end - k_start + 1) * step / ramp_steps)`` capped at ``k_end`` (a linear staircase; the
paper increases k progressively -- the exact curve is a choice here). ``ramp_steps=0`` (default)
keeps ``k = cfg.k`` fixed: the plain frozen-random-router baseline. Combine weights: softmax over
the selected experts' (frozen) logits. At evaluation ``eval_k`` (default: the current scheduled
k) experts are used.
Driving the schedule: a ``step`` buffer advances by one in every training forward with grad
enabled (once per micro-batch; with gradient accumulation ``g`` pass ``ramp_steps`` in
micro-batches, i.e. optimizer steps x g). The buffer is checkpointed.

``mode="thor"`` -- Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic
Experts" (THOR, ICLR 2022, arXiv:2110.04260). Experts are activated at random for each input, in
training and at inference: every token gets ``k`` distinct experts drawn uniformly (combine
weight ``1/k``). THOR trains with a consistency-regularised loss: two forward passes (different
random experts) give logits ``a`` and ``b`` and the objective is ``CE(a) + CE(b) + alpha *
(KL(p_a || p_b) + KL(p_b || p_a)) / 2`` (symmetric KL between the two predicted distributions);
:func:`thor_consistency_loss` computes the regulariser -- running the two passes belongs in the
training loop (not wired into moelab's trainer). Not included: THOR's variant that samples
experts per batch instead of per token.

Neither mode has learnable parameters; ``probs_TE`` is the frozen softmax (frozen) or the
uniform distribution (thor), so balance losses have no gradient to give (set ``aux_loss="none"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_choice, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers.base import ROUTERS, Router
from moelab.layers.routing import RoutingContext, RoutingResult


def thor_consistency_loss(logits_a: Tensor, logits_b: Tensor, valid: Tensor | None = None) -> Tensor:
    """THOR's symmetric KL ``(KL(p_a||p_b) + KL(p_b||p_a)) / 2`` between two passes' predictions,
    averaged over positions (``valid`` masks padding). Zero iff the two distributions agree."""
    la = torch.log_softmax(logits_a.float(), dim=-1)
    lb = torch.log_softmax(logits_b.float(), dim=-1)
    kl = 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))
    if valid is None:
        return kl.mean()
    w = valid.to(kl.dtype).reshape(kl.shape)
    return (kl * w).sum() / w.sum().clamp_min(1.0)


@ROUTERS.register(
    "random_fixed",
    description="frozen random router with a growing-k schedule (SMoE-Dropout) or random experts per token (THOR)",
    paper="Chen et al. 2023, Sparse MoE as the New Dropout (SMoE-Dropout); "
    "Zuo et al. 2022, Taming Sparsely Activated Transformer with Stochastic Experts (THOR)",
)
class RandomFixedRouter(Router):
    causal = True
    supports_aux_free = False

    def __init__(self, cfg: MoEConfig, *, mode: str = "frozen", k_start: int | None = None,
                 k_end: int | None = None, ramp_steps: int = 0, eval_k: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(cfg)
        self.mode = check_choice("router_kwargs.mode", mode, ["frozen", "thor"])
        E = cfg.num_experts
        self.k_start = int(check_range("router_kwargs.k_start", cfg.k if k_start is None else k_start, low=1, high=E))
        self.k_end = int(check_range("router_kwargs.k_end", E if k_end is None else k_end, low=1, high=E))
        if self.k_end < self.k_start:
            raise MoelabError(f"router_kwargs.k_end={self.k_end} must be >= k_start={self.k_start}")
        self.ramp_steps = int(check_range("router_kwargs.ramp_steps", ramp_steps, low=0))
        self.eval_k = None if eval_k is None else int(check_range("router_kwargs.eval_k", eval_k, low=1, high=E))
        g = torch.Generator().manual_seed(int(seed))
        # a buffer, not a Parameter: the frozen router is never trained and never receives gradient
        self.register_buffer("weight_ED", torch.randn(E, cfg.d_model, generator=g) * cfg.init_std)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def current_k(self) -> int:
        """The number of experts a training forward activates now (SMoE-Dropout schedule)."""
        if self.mode == "thor" or self.ramp_steps == 0:
            return self.k
        s = int(self.step)
        k = self.k_start + ((self.k_end - self.k_start + 1) * s) // self.ramp_steps
        return min(k, self.k_end)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        T, E = x_TD.shape[0], self.num_experts
        k = self.current_k()
        if not self.training and self.eval_k is not None:
            k = self.eval_k
        if self.training and torch.is_grad_enabled():
            self.step += 1
        if self.mode == "thor":
            idx_TK = torch.rand(T, E, device=x_TD.device).argsort(dim=-1)[:, :k]
            w_TK = torch.full((T, k), 1.0 / k, device=x_TD.device)
            probs_TE = torch.full((T, E), 1.0 / E, device=x_TD.device)
            return RoutingResult.from_topk(idx_TK, w_TK, E, probs_TE=probs_TE)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.weight_ED.float().t()  # a buffer: no gradient to the router
        idx_TK = torch.topk(logits_TE.detach(), k, dim=-1).indices
        w_TK = torch.softmax(logits_TE.gather(1, idx_TK), dim=-1)
        return RoutingResult.from_topk(idx_TK, w_TK, E, logits_TE=logits_TE,
                                       probs_TE=torch.softmax(logits_TE, dim=-1))
