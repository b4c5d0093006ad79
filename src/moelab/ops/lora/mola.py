"""MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts"): per adapted projection a mixture of
LoRA experts with a top-k router (``dW x = sum_{e in top-k} w_e (alpha / r) B_e A_e x``, Switch balance
loss), and a layer-wise allocation that gives higher layers more experts. ``allocation="increasing"`` is
the paper's best "triangle" MoLA-▽ shape 2-4-6-8: blocks in depth quarter q (0..3) get
``max(k, round(experts * (q + 1) / 4))`` experts (``experts`` = the top quarter's count);
``"uniform"`` gives every block ``experts``.

Choice: all experts of a projection are evaluated densely and weighted (zeros for unselected), exact
and simple at this scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.ops.lora.base import (
    AdapterConfig, AdaptedFFN, Router, balance, build_projection_adapter, lora_pair, topk_weights,
)
from moelab.ops.lora.registry import ADAPTERS


def experts_for_block(index: int, n_blocks: int, cfg: AdapterConfig) -> int:
    if cfg.allocation == "uniform":
        return cfg.experts
    quarter = min(3, 4 * index // max(n_blocks, 1))
    return max(cfg.k, round(cfg.experts * (quarter + 1) / 4))


class MoLADelta(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, cfg: AdapterConfig, n_experts: int) -> None:
        super().__init__()
        self.cfg, self.scale, self.k = cfg, cfg.alpha / cfg.rank, min(cfg.k, n_experts)
        self.A_ErI, self.B_EOr = lora_pair(n_experts, cfg.rank, in_dim, out_dim)
        self.router = Router(in_dim, n_experts, torch.Generator().manual_seed(cfg.seed))
        self.aux: dict[str, Tensor] = {}

    def forward(self, x_TI: Tensor) -> Tensor:
        probs_TE = self.router(x_TI)
        w_TE = topk_weights(probs_TE, self.k).to(x_TI.dtype)
        self.aux = {"aux_loss": balance(probs_TE, w_TE, self.cfg.aux_loss_coef)}
        z_TEr = torch.einsum("ti,eri->ter", x_TI, self.A_ErI)
        return self.scale * torch.einsum("ter,eor,te->to", z_TEr, self.B_EOr, w_TE)


@ADAPTERS.register("mola", description="top-k LoRA experts per projection, more experts in higher layers",
                   paper="Gao et al. 2024 (MoLA)")
def build_mola(base: nn.Module, cfg: AdapterConfig, *, index: int = 0, n_blocks: int = 1, **_: object) -> AdaptedFFN:
    n = experts_for_block(index, n_blocks, cfg)
    return build_projection_adapter(base, cfg, lambda t, i, o: MoLADelta(i, o, cfg, n))
