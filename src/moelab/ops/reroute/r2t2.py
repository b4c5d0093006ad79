"""R2-T2: Re-Routing in Test-Time (Li et al. 2025, "R2-T2: Re-Routing in Test-Time for Multimodal
Mixture-of-Experts").

For a test sample, find its k nearest *successful* reference samples by the model's hidden state and
move the sample's routing weights toward theirs. Strategies (the paper's three): ``knn`` (toward the
neighbours' mean routing vector), ``kernel`` (toward the Gaussian-kernel-weighted mean, bandwidth the
median neighbour distance: kernel regression), and ``ngd`` (neighbourhood gradient descent: a few
gradient steps on the routing offsets that lower the neighbours' mean loss). Choices: R2-T2 routes a
vision encoder with one routing vector per sample; in a token-routed LM the sample's vector is the
mean over its prompt tokens of each layer's routing distribution, and the move is applied as a
per-expert logit offset to every token of every MoE layer (:func:`move_toward`); ``lam`` is the step
size (one step; the paper iterates with re-searched neighbourhoods, ``steps`` > 1 does so for ngd).
"""

from __future__ import annotations

import torch

from moelab.errors import check_choice, check_range
from moelab.ops.reroute.base import REROUTE_METHODS, Adaptation, gaussian_weights, move_toward
from moelab.ops.reroute.offsets import logit_offsets
from moelab.ops.reroute.samples import continuation_loss, neighbours

STRATEGIES = ("knn", "kernel", "ngd")


def neighbour_target(x, nbrs, layer: int, weights) -> torch.Tensor:
    return sum(w * n.pathway[layer] for w, n in zip(weights.tolist(), nbrs))


def ngd(model, sites, nbrs, masks, *, steps: int, lr: float):
    """Gradient steps on the offsets (entries in ``masks``) lowering the neighbours' mean loss."""
    deltas = {s.index: torch.zeros(s.layer.cfg.num_experts, requires_grad=True) for s in sites}
    opt = torch.optim.Adam(list(deltas.values()), lr=lr)
    spent = 0.0
    for _ in range(steps):
        opt.zero_grad()
        with logit_offsets(sites, {i: d * masks[i] for i, d in deltas.items()}):
            loss = torch.stack([continuation_loss(model, n) for n in nbrs]).mean()
        loss.backward()
        opt.step()
        spent += 3.0 * sum(len(n.ids_L) for n in nbrs)
    return {i: (d * masks[i]).detach() for i, d in deltas.items()}, spent


@REROUTE_METHODS.register("r2t2", description="move routing weights toward successful neighbours' (kNN, kernel, NGD)",
                          paper="Li et al. 2025, R2-T2: Re-Routing in Test-Time for Multimodal Mixture-of-Experts")
class R2T2:
    def __init__(self, *, strategy: str = "kernel", neighbours: int = 5, lam: float = 0.5, steps: int = 3,
                 lr: float = 0.1) -> None:
        self.strategy = check_choice("strategy", strategy, STRATEGIES)
        self.k = int(check_range("neighbours", neighbours, low=1))
        self.lam = float(check_range("lam", lam, low=0.0, high=1.0))
        self.steps = int(check_range("steps", steps, low=0))
        self.lr = float(check_range("lr", lr, low=0.0))

    def adapt(self, model, sites, x, refs) -> Adaptation:
        nbrs, sim = neighbours(x, refs, self.k)
        if self.strategy == "ngd":
            masks = {s.index: torch.ones(s.layer.cfg.num_experts) for s in sites}
            deltas, spent = ngd(model, sites, nbrs, masks, steps=self.steps, lr=self.lr)
            return Adaptation(deltas, spent, {"neighbours": len(nbrs)})
        w = torch.full((len(nbrs),), 1 / len(nbrs)) if self.strategy == "knn" else gaussian_weights(1 - sim)
        deltas = {s.index: move_toward(x.pathway[s.index], neighbour_target(x, nbrs, s.index, w), self.lam)
                  for s in sites}
        return Adaptation(deltas, 0.0, {"neighbours": len(nbrs)})
