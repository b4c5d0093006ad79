"""C3PO: Critical-Layer, Core-Expert, Collaborative Pathway Optimization for test-time expert
re-mixing (Li et al. 2025).

Per test sample, re-mix only the *core experts* (the ``core`` highest-weighted experts of the sample's
pathway in that layer) of the *critical layers* (default: the last 30% of MoE layers, at least one;
the paper finds the last layers matter most), against a surrogate built from the sample's successful
neighbours: ``mode`` (mode-finding: mean-shift over the neighbours' pathways, started from the
sample's own, toward the densest pathway), ``kernel`` (kernel regression of the neighbours' pathways
on hidden-state similarity), ``ngd`` (neighbourhood gradient descent on the neighbours' mean loss).
As in :mod:`moelab.ops.reroute.r2t2`, pathways are prompt-mean routing distributions and the move is
a per-expert logit offset; only the core entries of the critical layers are non-zero.
"""

from __future__ import annotations

import math

import torch

from moelab.errors import MoelabError, check_choice, check_range
from moelab.ops.reroute.base import REROUTE_METHODS, Adaptation, gaussian_weights, move_toward
from moelab.ops.reroute.r2t2 import neighbour_target, ngd
from moelab.ops.reroute.samples import neighbours

SURROGATES = ("mode", "kernel", "ngd")


def critical_layers(sites, fraction: float, layers: list[int] | None):
    if layers is not None:
        return [s for s in sites if s.index in set(layers)]
    n = max(1, math.ceil(fraction * len(sites)))
    return sites[-n:]


def mean_shift(start_E: torch.Tensor, points_NE: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Mode of the neighbours' pathways nearest ``start`` (Gaussian mean-shift, median bandwidth)."""
    w = start_E
    for _ in range(iters):
        d = (points_NE - w[None]).norm(dim=-1)
        w = (gaussian_weights(d)[:, None] * points_NE).sum(0)
    return w


@REROUTE_METHODS.register("c3po", description="re-mix core experts of critical layers toward successful neighbours",
                          paper="Li et al. 2025, C3PO: Critical-Layer, Core-Expert, Collaborative Pathway "
                                "Optimization for Test-Time Expert Re-Mixing")
class C3PO:
    def __init__(self, *, surrogate: str = "kernel", neighbours: int = 5, lam: float = 0.5, core: int | None = None,
                 critical_fraction: float = 0.3, layers: list[int] | None = None, steps: int = 3,
                 lr: float = 0.1) -> None:
        self.surrogate = check_choice("surrogate", surrogate, SURROGATES)
        self.k = int(check_range("neighbours", neighbours, low=1))
        self.lam = float(check_range("lam", lam, low=0.0, high=1.0))
        self.core = core
        self.fraction = float(check_range("critical_fraction", critical_fraction, low=0.0, high=1.0,
                                          low_inclusive=False))
        self.layers, self.steps, self.lr = layers, int(check_range("steps", steps, low=0)), float(lr)

    def _mask(self, x, site) -> torch.Tensor:
        E = site.layer.cfg.num_experts
        m = min(E, self.core if self.core is not None else 2 * site.layer.cfg.k)
        if m < 1:
            raise MoelabError(f"core={self.core} must be >= 1")
        mask = torch.zeros(E)
        mask[x.pathway[site.index].topk(m).indices] = 1.0
        return mask

    def adapt(self, model, sites, x, refs) -> Adaptation:
        crit = critical_layers(sites, self.fraction, self.layers)
        nbrs, sim = neighbours(x, refs, self.k)
        masks = {s.index: self._mask(x, s) for s in crit}
        if self.surrogate == "ngd":
            deltas, spent = ngd(model, crit, nbrs, masks, steps=self.steps, lr=self.lr)
            return Adaptation(deltas, spent, {"critical_layers": [s.index for s in crit]})
        deltas = {}
        for s in crit:
            if self.surrogate == "kernel":
                target = neighbour_target(x, nbrs, s.index, gaussian_weights(1 - sim))
            else:
                target = mean_shift(x.pathway[s.index], torch.stack([n.pathway[s.index] for n in nbrs]))
            deltas[s.index] = move_toward(x.pathway[s.index], target, self.lam, masks[s.index])
        return Adaptation(deltas, 0.0, {"critical_layers": [s.index for s in crit]})
