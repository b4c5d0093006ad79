"""Sub-MoE (Li et al. 2025, "Sub-MoE: Efficient Mixture-of-Expert LLMs Compression via Subspace Expert
Merging"):

1. cluster the layer's experts with K-means on the cosine similarity of their outputs over the
   calibration sample (each expert's outputs on the common tokens, flattened and L2-normalised;
   k-means++ seeding with a fixed seed, empty clusters re-seeded);
2. per cluster and weight matrix, a joint SVD of the concatenated experts ``[W_1 .. W_n] = U S [V_1 .. V_n]^T``
   (union decomposition): a shared basis U and expert-specific V_i; ``W_i = U S V_i^T`` exactly at
   full rank (:func:`joint_svd`);
3. merge the V_i by routing-frequency-weighted averaging and rebuild ``U S V_merged^T``; ``rank``
   truncates U, S, V (intra-expert compression; default None = full rank).

Choice: the shared basis is always on the model-dimension side (rows of ``w_down`` [D, F]; columns of
``w_up`` / ``w_gate`` [F, D], decomposed transposed), since hidden neurons are not aligned across experts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from moelab.errors import check_range
from moelab.ops.calibrate import LayerStats
from moelab.ops.merge.base import MERGE_METHODS, groups_of, layer_weights, renumber, stack


def kmeans(z_EX: np.ndarray, n_clusters: int, *, seed: int = 0, iters: int = 50) -> list[int]:
    """K-means (k-means++ init) of the rows of ``z_EX``; labels 0..n-1, no empty cluster."""
    rng = np.random.default_rng(seed)
    E = len(z_EX)
    centers = [z_EX[rng.integers(E)]]
    for _ in range(1, n_clusters):
        d = np.min([((z_EX - c) ** 2).sum(1) for c in centers], axis=0)
        centers.append(z_EX[rng.choice(E, p=d / d.sum())] if d.sum() > 0 else z_EX[rng.integers(E)])
    C = np.stack(centers)
    labels = np.zeros(E, dtype=int)
    for _ in range(iters):
        labels = ((z_EX[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
        for c in range(n_clusters):
            if not (labels == c).any():  # re-seed an empty cluster with the farthest point
                far = ((z_EX - C[labels]) ** 2).sum(1).argmax()
                labels[far] = c
            C[c] = z_EX[labels == c].mean(0)
    return renumber(labels.tolist())


def joint_svd(ws: list[Tensor], rank: int | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``[W_1 .. W_n]`` (each [R, C]) = ``U diag(S) [V_1 .. V_n]^T``; returns U [R, r], S [r], V_i [C, r]."""
    U, S, Vh = torch.linalg.svd(torch.cat(ws, dim=1).double(), full_matrices=False)
    r = len(S) if rank is None else min(int(rank), len(S))
    V = Vh[:r].T
    C = ws[0].shape[1]
    return U[:, :r], S[:r], [V[i * C:(i + 1) * C] for i in range(len(ws))]


def merge_subspace(ws: list[Tensor], freq: np.ndarray, rank: int | None) -> Tensor:
    U, S, Vs = joint_svd(ws, rank)
    a = np.ones(len(ws)) if freq.sum() <= 0 else freq / freq.sum()
    V = sum(float(ai) * v for ai, v in zip(a, Vs))
    return (U * S) @ V.T


def _merge_group(w: dict[str, Tensor], members: list[int], freq: np.ndarray, rank: int | None) -> dict[str, Tensor]:
    out = {}
    for name, t in w.items():
        if name == "w_down_EDF":
            out[name] = merge_subspace([t[e] for e in members], freq, rank)
        else:  # [F, D]: shared basis over D -> decompose the transposes
            out[name] = merge_subspace([t[e].T for e in members], freq, rank).T
    return out


@MERGE_METHODS.register("sub_moe", description="K-means on output similarity, joint-SVD shared basis, "
                        "frequency-weighted merge of expert factors", paper="Li et al. 2025 (Sub-MoE)")
def sub_moe(layer: nn.Module, st: LayerStats, n_out: int, *, rank: int | None = None, seed: int = 0
            ) -> tuple[list[int], dict[str, Tensor]]:
    if rank is not None:
        check_range("rank", rank, low=1)
    z = torch.nn.functional.normalize(st.out_END.reshape(st.num_experts, -1).double(), dim=1).numpy()
    emap = kmeans(z, n_out, seed=seed)
    w = layer_weights(layer)
    return emap, stack([_merge_group(w, g, st.count_E[g], rank) for g in groups_of(emap)])
