"""M-SMoE (Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing
Policy", UNITES-Lab/MC-SMoE), the merging stage of MC-SMoE:

1. dominant experts: the ``n_out`` most frequently routed experts of the layer (calibration counts;
   the paper's per-layer budget variant);
2. every other expert joins the dominant expert whose router logits are most similar (cosine of the
   experts' logit columns over the calibration sample; "router-logits" similarity of the paper);
3. each member's hidden neurons are aligned to the dominant expert by weight matching (permutation,
   Hungarian algorithm on the neurons' concatenated gate/up rows and down columns);
4. the group is merged as the usage-frequency-weighted average of the aligned weights.

The router is kept: members route to the merged expert (see :mod:`moelab.ops.merge.base`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from moelab.ops.calibrate import LayerStats
from moelab.ops.merge.base import (
    MERGE_METHODS, align_permutation, layer_weights, one_expert, permute_expert, stack, weighted_average,
)
from moelab.ops.prune.base import top_experts


def logit_similarity(logits_NE: Tensor) -> np.ndarray:
    """``[E, E]`` cosine similarity of the experts' router-logit columns."""
    z = torch.nn.functional.normalize(logits_NE.double().T, dim=1)
    return (z @ z.T).numpy()


def group_by_dominant(count_E: np.ndarray, sim_EE: np.ndarray, n_out: int) -> list[int]:
    """Expert map: dominant experts (by count) numbered 0..n_out-1 in index order; others -> most similar."""
    dominant = top_experts(count_E, n_out)
    emap = [0] * len(count_E)
    for j, d in enumerate(dominant):
        emap[d] = j
    for e in range(len(count_E)):
        if e not in dominant:
            emap[e] = int(np.argmax([sim_EE[e, d] for d in dominant]))
    return emap


def merge_aligned(w: dict[str, Tensor], groups: list[list[int]], dominant: list[int],
                  freq_E: np.ndarray) -> dict[str, Tensor]:
    merged = []
    for d, members in zip(dominant, groups):
        aligned = [one_expert(w, d) if e == d else permute_expert(w, e, align_permutation(w, d, e)) for e in members]
        merged.append(weighted_average(aligned, freq_E[members]))
    return stack(merged)


@MERGE_METHODS.register("m_smoe", description="dominant experts by frequency, router-logit grouping, "
                        "permutation alignment, frequency-weighted merge", paper="Li et al. 2024 (MC-SMoE)")
def m_smoe(layer: nn.Module, st: LayerStats, n_out: int) -> tuple[list[int], dict[str, Tensor]]:
    emap = group_by_dominant(st.count_E, logit_similarity(st.logits_NE), n_out)
    dominant = top_experts(st.count_E, n_out)
    groups = [[e for e, g in enumerate(emap) if g == j] for j in range(n_out)]
    return emap, merge_aligned(layer_weights(layer), groups, dominant, st.count_E)
