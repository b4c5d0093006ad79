"""Granular (fine-grained) upcycling with virtual-group initialisation and weight scaling.

He et al. 2024, "Upcycling Large Language Models into Mixture of Experts" (NVIDIA; Megatron-LM's
``--moe-upcycling-granularity``): split each dense FFN's F hidden units into G shards of F/G; the E
experts are E/G copies of the G shards (expert ``c * G + g`` = shard g, "virtual group" c). The router
rows of one virtual group are equal, so with k a multiple of G top-k selects whole groups; with
softmax-then-top-k and renormalised weights the selected shards sum to FFN(x) / G, which the weight
scaling undoes: ``MoEConfig.routed_scale = G``. The layer then equals the dense FFN at step 0 (tested).

Choices: E and k must be multiples of G and G must divide F (raised otherwise); the scaling is kept as
a layer option rather than folded into the down projections so the experts stay exact shards; shared
experts and Drop-Upcycling work as in :mod:`moelab.ops.upcycle.sparse`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.ops.upcycle.dense import dense_ffn_sites, ffn_weights
from moelab.ops.upcycle.registry import UPCYCLE_CONFIGS, UPCYCLERS
from moelab.ops.upcycle.sparse import DenseUpcycleConfig, upcycle_dense


@dataclass(kw_only=True)
class GranularUpcycleConfig(DenseUpcycleConfig):
    granularity: int = 2

    def validate(self, granularity: int = 1) -> None:
        G = check_range("granularity", self.granularity, low=1)
        super().validate(G)
        for name in ("num_experts", "k"):
            if getattr(self, name) % G:
                raise MoelabError(f"{name}={getattr(self, name)} must be a multiple of granularity={G} "
                                  "(whole virtual groups)")


@UPCYCLERS.register("granular", description="split each FFN into G shards, E/G copies, virtual-group router",
                    paper="He et al. 2024 (Upcycling LLMs into MoE; Megatron granular upcycling)")
def granular_upcycle(model: nn.Module, cfg: GranularUpcycleConfig, *, template: MoEConfig | None = None) -> nn.Module:
    cfg.validate()
    for s in dense_ffn_sites(model):
        if ffn_weights(s.module).d_ff % cfg.granularity:
            raise MoelabError(f"granularity={cfg.granularity} must divide the dense FFN width "
                              f"d_ff={ffn_weights(s.module).d_ff} (block {s.index})")
    return upcycle_dense(model, cfg, granularity=cfg.granularity, method="granular", template=template)


UPCYCLE_CONFIGS["granular"] = GranularUpcycleConfig
