"""Rewiring Experts on the Fly (data-free continuous test-time rerouting; seed catalog row 48).

At prefill, optimise small additive vectors ``delta_l`` on the router logits of the chosen layers by
self-supervision on the input's own context: a few steps of the next-token loss of the prompt (no
continuation token is seen), then score the continuation with the adapted routers; the deltas are
reset for the next input. Only the deltas change (no weights, no external data). Choices: Adam with
``lr`` for ``steps`` steps from zero; the paper also re-adapts every N generated tokens during
generation, which scoring a fixed continuation does not need.
"""

from __future__ import annotations

import torch

from moelab.errors import check_range
from moelab.ops.reroute.base import REROUTE_METHODS, Adaptation
from moelab.ops.reroute.offsets import logit_offsets
from moelab.ops.reroute.samples import prompt_loss


@REROUTE_METHODS.register("rewire", description="optimise router-logit offsets on the prompt's own next-token loss",
                          paper="Rewiring Experts on the Fly: Continuous Rerouting for Better Online Adaptation "
                                "in Mixture-of-Expert models (2025)")
class Rewire:
    needs_reference = False

    def __init__(self, *, steps: int = 5, lr: float = 0.05) -> None:
        self.steps = int(check_range("steps", steps, low=0))
        self.lr = float(check_range("lr", lr, low=0.0))

    def adapt(self, model, sites, x, refs) -> Adaptation:
        deltas = {s.index: torch.zeros(s.layer.cfg.num_experts, requires_grad=True) for s in sites}
        opt = torch.optim.Adam(list(deltas.values()), lr=self.lr)
        for _ in range(self.steps):
            opt.zero_grad()
            with logit_offsets(sites, deltas):
                loss = prompt_loss(model, x)
            loss.backward()
            opt.step()
        return Adaptation({i: d.detach() for i, d in deltas.items()}, 3.0 * self.steps * x.prompt_len)
