"""Plain LoRA on the FFN projections (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models"): ``W x + (alpha / r) B A x`` with A Kaiming-uniform and B zero, W frozen. The baseline the
mixtures are compared with, and the only adapter that ``merge`` folds into the base."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moelab.ops.lora.base import AdapterConfig, AdaptedFFN, build_projection_adapter, lora_pair
from moelab.ops.lora.registry import ADAPTERS


class LoRADelta(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.A_rI, self.B_Or = lora_pair(None, rank, in_dim, out_dim)

    def forward(self, x_TI: Tensor) -> Tensor:
        return self.scale * F.linear(F.linear(x_TI, self.A_rI), self.B_Or)

    def delta_weight(self) -> Tensor:
        """``(alpha / r) B A`` as an ``[O, I]`` matrix (what merging adds to W)."""
        return self.scale * self.B_Or @ self.A_rI


@ADAPTERS.register("lora", description="one LoRA per FFN projection (mergeable)", paper="Hu et al. 2021 (LoRA)")
def build_lora(base: nn.Module, cfg: AdapterConfig, **_: object) -> AdaptedFFN:
    return build_projection_adapter(base, cfg, lambda t, i, o: LoRADelta(i, o, cfg.rank, cfg.alpha))
