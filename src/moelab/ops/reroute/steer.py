"""Routing steering: a router-logit bias toward the experts a domain's text uses (after the
multilingual-routing paper, which boosts middle-layer "task experts" frequently activated for English;
seed catalog rows 51/24).

``derive_bias(samples, sites, top, strength)``: per chosen layer, the ``top`` experts with the highest
mean routing probability over the samples of the *toward* domain get ``+strength`` on their logits
(others 0). The same offset is applied to every input (no per-sample compute). Choice: the paper
selects experts by activation frequency on the task; the mean routing probability is its soft
version and is defined for every router that reports ``probs_TE``.
"""

from __future__ import annotations

import torch

from moelab.errors import MoelabError, check_range
from moelab.ops.reroute.base import REROUTE_METHODS, Adaptation


def derive_bias(samples, sites, *, top: int, strength: float) -> dict[int, torch.Tensor]:
    if not samples:
        raise MoelabError("steering needs samples of the --toward domain; got none")
    out = {}
    for s in sites:
        E = s.layer.cfg.num_experts
        check_range("top", top, low=1, high=E)
        use_E = torch.stack([x.pathway[s.index] for x in samples]).mean(0)
        bias = torch.zeros(E)
        bias[use_E.topk(top).indices] = float(strength)
        out[s.index] = bias
    return out


@REROUTE_METHODS.register("steer", description="bias router logits toward the experts a domain's text uses",
                          paper="Multilingual Routing in Mixture-of-Experts (2025): middle-layer routing steering")
class Steer:
    needs_reference = True

    def __init__(self, *, top: int | None = None, strength: float = 1.0) -> None:
        self.top, self.strength = top, float(strength)
        self._bias: dict[int, torch.Tensor] | None = None

    def fit(self, sites, toward_samples) -> None:
        top = self.top if self.top is not None else sites[0].layer.cfg.k
        self._bias = derive_bias(toward_samples, sites, top=top, strength=self.strength)

    def adapt(self, model, sites, x, refs) -> Adaptation:
        if self._bias is None:
            self.fit(sites, refs)
        return Adaptation(dict(self._bias), 0.0)
