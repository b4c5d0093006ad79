"""HC-SMoE (Chen et al. 2025, "Retraining-Free Merging of Sparse Mixture-of-Experts via Hierarchical
Clustering", ICML 2025): cluster the experts of a layer by their outputs, not by routing, then merge.

- representation of expert e: its output averaged over the calibration sample (every expert run on
  the same tokens, routed or not), ``mean_N f_e(x_N)``;
- agglomerative (hierarchical) clustering with average linkage down to ``n_out`` clusters; distance
  1 - cosine similarity of the representations (our choice of metric; the paper's default linkage);
- merge: plain average of the cluster's weights (``weighting="average"``; ``"frequency"`` weights by
  routed counts), no neuron alignment.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from moelab.errors import check_choice
from moelab.ops.calibrate import LayerStats
from moelab.ops.merge.base import MERGE_METHODS, groups_of, layer_weights, one_expert, renumber, stack, weighted_average


def average_linkage(dist_EE: np.ndarray, n_clusters: int) -> list[int]:
    """Agglomerative clustering (average linkage) of E items to ``n_clusters``; labels 0..n-1."""
    clusters = [[e] for e in range(len(dist_EE))]
    while len(clusters) > n_clusters:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                d = float(dist_EE[np.ix_(clusters[i], clusters[j])].mean())
                if best is None or d < best[0] - 1e-12:
                    best = (d, i, j)
        _, i, j = best
        clusters[i] = sorted(clusters[i] + clusters.pop(j))
    labels = [0] * len(dist_EE)
    for c, members in enumerate(clusters):
        for e in members:
            labels[e] = c
    return renumber(labels)


def cosine_distance(rep_EX: Tensor) -> np.ndarray:
    z = torch.nn.functional.normalize(rep_EX.double(), dim=1)
    return (1.0 - z @ z.T).numpy()


@MERGE_METHODS.register("hc_smoe", description="hierarchical clustering of expert outputs, average merge",
                        paper="Chen et al. 2025 (HC-SMoE)")
def hc_smoe(layer: nn.Module, st: LayerStats, n_out: int, *, weighting: str = "average"
            ) -> tuple[list[int], dict[str, Tensor]]:
    check_choice("weighting", weighting, ["average", "frequency"])
    emap = average_linkage(cosine_distance(st.out_END.mean(1)), n_out)
    w = layer_weights(layer)
    merged = []
    for members in groups_of(emap):
        a = st.count_E[members] if weighting == "frequency" else np.ones(len(members))
        merged.append(weighted_average([one_expert(w, e) for e in members], a))
    return emap, stack(merged)
