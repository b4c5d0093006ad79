"""Sparse upcycling: each chosen dense FFN becomes E identical experts plus a fresh router.

Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"
(ICLR): copy the dense MLP into every expert, add a newly initialised router, upcycle every other
layer or all layers, then continue training. OLMoE (Muennighoff et al. 2024,
``scripts/sparsify_ckpt_unsharded.py``) does the same copy for every layer.

What this implements, and the choices we made:

- Blocks: every ``every``-th dense block (``every=1``: all; ``every=2``: blocks 1, 3, ... as the
  paper's "every other layer"), or the explicit ``layers`` list.
- Router: ``softmax_topk`` with renormalised top-k weights (k > 1) and a fresh N(0, router_init_std)
  gate. With identical experts and weights summing to 1 the layer equals the dense FFN at step 0
  (tested to 1e-5 in fp32). For k = 1 the weight is the raw softmax probability (the router rejects
  renormalised k = 1, which would be untrainable), so k = 1 is *not* function-preserving.
- Shared experts (Qwen1.5-MoE / DeepSeekMoE style): each of the ``num_shared_experts`` shared
  experts is another full copy of the FFN; to preserve the function the shared path carries
  ``shared_fraction`` of the output (its down projections scaled by shared_fraction / n) and the
  routed path the rest (``MoEConfig.routed_scale`` = 1 - shared_fraction). Our choice.
- ``drop_ratio`` > 0: Drop-Upcycling (Nakamura et al. 2025), re-draw that fraction of each expert's
  hidden units (breaks preservation on purpose; the paper's best ratio is 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoELayer
from moelab.models.moe_protocol import moe_layers
from moelab.ops.upcycle.common import check_preserving_router, drop_reinit_, router_matrix
from moelab.ops.upcycle.dense import DenseWeights, dense_ffn_sites, ffn_weights, replace_dense_ffn
from moelab.ops.upcycle.registry import UPCYCLE_CONFIGS, UPCYCLERS


@dataclass(kw_only=True)
class DenseUpcycleConfig:
    """Options shared by the dense -> MoE recipes (sparse, granular)."""

    num_experts: int = 8
    k: int = 2
    every: int = 1
    layers: list[int] | None = None
    num_shared_experts: int = 0
    shared_fraction: float = 0.5
    drop_ratio: float = 0.0
    router_init_std: float = 0.02
    seed: int = 0

    def validate(self, granularity: int = 1) -> None:
        check_range("num_experts", self.num_experts, low=granularity)
        check_range("k", self.k, low=1, high=self.num_experts)
        check_range("every", self.every, low=1)
        check_range("num_shared_experts", self.num_shared_experts, low=0)
        check_range("shared_fraction", self.shared_fraction, low=0.0, high=1.0, low_inclusive=False,
                    high_inclusive=False)
        check_range("drop_ratio", self.drop_ratio, low=0.0, high=1.0)
        check_range("router_init_std", self.router_init_std, low=0.0)


def chosen_blocks(model: nn.Module, cfg: DenseUpcycleConfig, method: str) -> list[int]:
    """Indices of the dense blocks to upcycle; raises for a model without dense FFNs."""
    dense = [s.index for s in dense_ffn_sites(model)]
    if not dense:
        kind = "already MoE in every block" if moe_layers(model) else "without dense FFN blocks"
        raise MoelabError(f"method={method!r} upcycles dense FFNs; this model is {kind} "
                          "(use method='grow' to add experts to an MoE model)")
    if cfg.layers is not None:
        bad = sorted(set(cfg.layers) - set(dense))
        if bad:
            raise MoelabError(f"layers={cfg.layers} includes {bad}, which are not dense FFN blocks; dense: {dense}")
        return sorted(set(cfg.layers))
    return [i for i in dense if (i + 1) % cfg.every == 0]


def build_from_dense(w: DenseWeights, template: MoEConfig, cfg: DenseUpcycleConfig, granularity: int,
                     generator: torch.Generator) -> MoELayer:
    """An MoE layer whose expert ``c * G + g`` holds shard ``g`` of the dense FFN (G = granularity;
    G = 1 is sparse upcycling), with router rows equal within each group of G (virtual groups)."""
    G, E, Fh = granularity, cfg.num_experts, w.d_ff
    shared = cfg.num_shared_experts > 0
    routed_frac = 1.0 - cfg.shared_fraction if shared else 1.0
    mcfg = replace(template, d_model=w.d_model, d_ff=Fh // G, num_experts=E, k=cfg.k,
                   num_shared_experts=cfg.num_shared_experts, shared_d_ff=Fh if shared else None,
                   routed_scale=G * routed_frac, init_std=cfg.router_init_std or template.init_std)
    check_preserving_router(mcfg, "upcycling")
    layer = MoELayer(mcfg).to(w.w_up_FD.dtype)
    f = Fh // G
    with torch.no_grad():
        bank = layer.experts
        for e in range(E):
            g = e % G
            bank.w_gate_EFD[e].copy_(w.w_gate_FD[g * f:(g + 1) * f])
            bank.w_up_EFD[e].copy_(w.w_up_FD[g * f:(g + 1) * f])
            bank.w_down_EDF[e].copy_(w.w_down_DF[:, g * f:(g + 1) * f])
        gate_ED = router_matrix(layer.router, E, w.d_model)
        fresh_CD = torch.randn((E // G, w.d_model), generator=generator) * cfg.router_init_std
        gate_ED.copy_(fresh_CD.repeat_interleave(G, dim=0).to(gate_ED))
        if cfg.drop_ratio > 0:
            drop_reinit_(bank.w_gate_EFD, bank.w_up_EFD, bank.w_down_EDF, cfg.drop_ratio, generator)
        if shared:
            _fill_shared(layer, w, cfg)
    return layer


def _fill_shared(layer: MoELayer, w: DenseWeights, cfg: DenseUpcycleConfig) -> None:
    n, Fh, sx = cfg.num_shared_experts, w.d_ff, layer.shared_experts
    for i in range(n):
        sx.w_gate_FD[i * Fh:(i + 1) * Fh].copy_(w.w_gate_FD)
        sx.w_up_FD[i * Fh:(i + 1) * Fh].copy_(w.w_up_FD)
        sx.w_down_DF[:, i * Fh:(i + 1) * Fh].copy_(w.w_down_DF * (cfg.shared_fraction / n))


def upcycle_dense(model: nn.Module, cfg: DenseUpcycleConfig, *, granularity: int = 1, method: str = "sparse",
                  template: MoEConfig | None = None) -> nn.Module:
    """Replace the chosen dense FFNs of ``model`` in place (through the dense-FFN seam); returns it."""
    cfg.validate(granularity)
    gen = torch.Generator().manual_seed(cfg.seed)
    for index in chosen_blocks(model, cfg, method):
        site_w = ffn_weights(next(s.module for s in dense_ffn_sites(model) if s.index == index))
        layer = build_from_dense(site_w, template or MoEConfig(), cfg, granularity, gen)
        replace_dense_ffn(model, index, layer.to(site_w.w_up_FD.device))
    return model


@UPCYCLERS.register("sparse", description="copy each dense FFN into E experts + a fresh router",
                    paper="Komatsuzaki et al. 2023 (Sparse Upcycling); Nakamura et al. 2025 (Drop-Upcycling)")
def sparse_upcycle(model: nn.Module, cfg: DenseUpcycleConfig, *, template: MoEConfig | None = None) -> nn.Module:
    return upcycle_dense(model, cfg, granularity=1, method="sparse", template=template)


UPCYCLE_CONFIGS["sparse"] = DenseUpcycleConfig
