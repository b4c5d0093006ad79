"""DynMoLE (Li et al. 2025, "DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid Routing
Mechanism"): MixLoRA-style LoRA experts in each FFN whose routing mode follows the router's uncertainty,
measured by the Tsallis entropy ``S_q(p) = (1 - sum_i p_i^q) / (q - 1)``: tokens whose entropy exceeds
``entropy_threshold`` times the maximum ``(1 - E^(1-q)) / (q - 1)`` use soft routing over all experts
(weights p), the others top-k (renormalised); an auxiliary loss ``entropy_loss_coef * mean S_q`` lowers
the uncertainty, on top of the Switch balance loss.

Choices (the abstract leaves them open): q = 1.5, threshold 0.9 of the maximum entropy, the entropy
loss on the mean over tokens, balance counts = experts with non-zero weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.ops.lora.base import AdapterConfig, balance, topk_weights
from moelab.ops.lora.mixlora import MixLoRAFFN
from moelab.ops.lora.registry import ADAPTERS


def tsallis_entropy(probs_TE: Tensor, q: float) -> Tensor:
    return (1.0 - probs_TE.pow(q).sum(-1)) / (q - 1.0)


def max_tsallis_entropy(E: int, q: float) -> float:
    return (1.0 - E ** (1.0 - q)) / (q - 1.0)


class DynMoLEFFN(MixLoRAFFN):
    def route(self, x_TD: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        probs_TE = self.router(x_TD)
        s_T = tsallis_entropy(probs_TE, cfg.tsallis_q)
        soft_T = s_T.detach() > cfg.entropy_threshold * max_tsallis_entropy(probs_TE.shape[1], cfg.tsallis_q)
        w_TE = torch.where(soft_T[:, None], probs_TE, topk_weights(probs_TE, self.k))
        self.last_soft_fraction = float(soft_T.float().mean())
        return w_TE, {"aux_loss": balance(probs_TE, w_TE, cfg.aux_loss_coef),
                      "entropy_loss": cfg.entropy_loss_coef * s_T.mean()}


@ADAPTERS.register("dynmole", description="LoRA experts with Tsallis-entropy hybrid (soft/top-k) routing",
                   paper="Li et al. 2025 (DynMoLE)")
def build_dynmole(base: nn.Module, cfg: AdapterConfig, **_: object) -> DynMoLEFFN:
    return DynMoLEFFN(base, cfg)
