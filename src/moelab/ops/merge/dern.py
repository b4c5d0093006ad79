"""DERN (Zhou et al. 2025, "Dropping Experts, Recombining Neurons: Retraining-Free Pruning for Sparse
Mixture-of-Experts LLMs"), retraining-free:

1. drop experts by router statistics: keep the ``n_out`` experts with the largest gate mass (summed
   combine weights over the calibration tokens); their router rows are removed as in pruning;
2. split every dropped expert into neuron-level segments (one row of ``w_gate`` / ``w_up`` with the
   matching column of ``w_down``) and give each segment to the retained expert holding the most
   similar neuron (cosine similarity of the concatenated segment vectors);
3. recombine inside each retained expert so its width stays F: each segment is averaged into its most
   similar neuron, weighted by the gate mass of the experts the pieces come from (our reading of the
   paper's segment merging: one assignment step of clustering with the retained neurons as centres).

Registered as a merging method; unlike the others it removes router rows instead of mapping them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from moelab.ops.calibrate import LayerStats
from moelab.ops.merge.base import MERGE_METHODS, layer_weights, neuron_features
from moelab.ops.prune.base import top_experts


def _split(feat_F: Tensor, w: dict[str, Tensor]) -> dict[str, Tensor]:
    """Neuron features [F, G + U + D] back into the expert's weights."""
    D = w["w_up_EFD"].shape[2]
    parts = (["w_gate_EFD"] if "w_gate_EFD" in w else []) + ["w_up_EFD", "w_down_EDF"]
    out = {}
    for i, name in enumerate(parts):
        block = feat_F[:, i * D:(i + 1) * D]
        out[name] = block.T if name == "w_down_EDF" else block
    return out


def recombine(w: dict[str, Tensor], keep: list[int], mass_E: np.ndarray) -> tuple[dict[str, Tensor], dict[int, int]]:
    """Retained experts' weights after absorbing the dropped experts' neurons; and segments per expert."""
    feats = {e: neuron_features(w, e) for e in range(w["w_up_EFD"].shape[0])}
    mass = np.maximum(mass_E, 1e-12)
    sums = {e: feats[e] * float(mass[e]) for e in keep}
    wsum = {e: torch.full((feats[e].shape[0], 1), float(mass[e]), dtype=feats[e].dtype) for e in keep}
    unit = {e: torch.nn.functional.normalize(feats[e], dim=1) for e in keep}
    absorbed = {e: 0 for e in keep}
    for d in (e for e in feats if e not in keep):
        seg = torch.nn.functional.normalize(feats[d], dim=1)
        sim_KFF = torch.stack([seg @ unit[e].T for e in keep])      # [kept, F_dropped, F_kept]
        best_F, where_F = sim_KFF.max(-1)                            # best neuron in each kept expert
        owner_F = best_F.argmax(0)                                   # most compatible retained expert
        for f in range(feats[d].shape[0]):
            e = keep[int(owner_F[f])]
            n = int(where_F[owner_F[f], f])
            sums[e][n] += feats[d][f] * float(mass[d])
            wsum[e][n] += float(mass[d])
            absorbed[e] += 1
    merged = [_split(sums[e] / wsum[e], w) for e in keep]
    return {n: torch.stack([m[n] for m in merged]) for n in merged[0]}, absorbed


@MERGE_METHODS.register("dern", description="drop experts by gate mass, recombine their neurons into the "
                        "retained experts", paper="Zhou et al. 2025 (DERN)")
def dern(layer: nn.Module, st: LayerStats, n_out: int) -> tuple[list[int], dict[str, Tensor]]:
    keep = top_experts(st.gate_sum_E, n_out)
    weights, _ = recombine(layer_weights(layer), keep, st.gate_sum_E)
    return keep, weights


dern.drops_experts = True  # type: ignore[attr-defined]
