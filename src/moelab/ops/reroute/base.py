"""The re-routing method contract and registry.

A method is a class registered in :data:`REROUTE_METHODS` with ``adapt(model, sites, sample, refs)
-> Adaptation``: the router-logit offsets to use for ``sample`` (from its prompt, and for the
reference-based methods from its successful neighbours in ``refs``) and the extra compute spent,
in tokens processed as forward-equivalents (a backward counts as two forwards). Methods never
change a parameter of the model; they may run it under offsets (:func:`logit_offsets`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.errors import check_range
from moelab.registry import Registry

REROUTE_METHODS: Registry[type] = Registry("re-routing method")


@dataclass
class Adaptation:
    deltas: dict[int, Tensor]
    extra_tokens: float = 0.0  # forward-equivalent tokens spent to find the deltas
    info: dict = field(default_factory=dict)


def move_toward(p_E: Tensor, target_E: Tensor, lam: float, mask_E: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Logit offset that moves routing distribution ``p_E`` to ``(1-lam) p + lam target`` (entries
    outside ``mask_E`` unchanged): ``log(mix) - log(p)``, a per-expert shift of every token's logits."""
    check_range("lam", lam, low=0.0, high=1.0)
    mix = (1 - lam) * p_E + lam * target_E
    delta = torch.log(mix.clamp_min(eps)) - torch.log(p_E.clamp_min(eps))
    return delta if mask_E is None else delta * mask_E


def gaussian_weights(d_N: Tensor) -> Tensor:
    """Kernel weights exp(-d^2 / h^2) with the median-distance bandwidth h (normalised to sum 1)."""
    h = d_N.median().clamp_min(1e-6)
    w = torch.exp(-(d_N / h) ** 2)
    return w / w.sum()
