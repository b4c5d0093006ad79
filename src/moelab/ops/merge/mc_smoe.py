"""MC-SMoE (Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing
Policy", UNITES-Lab/MC-SMoE): M-SMoE merging (:mod:`moelab.ops.merge.m_smoe`), then each merged
expert's weight matrices are compressed to a low-rank part plus a sparse part, ``W ~ U V + S``:
U V the rank-``r`` truncated SVD of W, S the largest-magnitude ``sparse`` fraction of the residual
``W - U V`` (structured-sparse in the paper, learned with a few fine-tuning steps; here one-shot
magnitude selection, our retraining-free reading). ``rank`` defaults to a quarter of min(out, in).

The model stores the dense ``U V + S`` (the layer has stacked dense weights); the manifest records
the parameters the factored form needs (``stored_expert_params``: r (out + in) + nnz(S) per matrix,
index storage not counted) and ``compress-compare`` counts those.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.errors import check_range
from moelab.ops.calibrate import LayerStats
from moelab.ops.merge.base import MERGE_METHODS
from moelab.ops.merge.m_smoe import m_smoe


def low_rank_plus_sparse(w: Tensor, rank: int, sparse: float) -> tuple[Tensor, int]:
    """``(U V + S, stored parameters)`` for one matrix ``w`` [out, in]."""
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = min(int(rank), len(S))
    low = (U[:, :r] * S[:r]) @ Vh[:r]
    resid = w.double() - low
    n_keep = int(round(sparse * resid.numel()))
    sp = torch.zeros_like(resid)
    if n_keep > 0:
        idx = resid.abs().flatten().topk(n_keep).indices
        sp.view(-1)[idx] = resid.view(-1)[idx]
    return (low + sp).to(w.dtype), r * (w.shape[0] + w.shape[1]) + n_keep


@MERGE_METHODS.register("mc_smoe", description="M-SMoE merge, then low-rank + sparse compression of each "
                        "merged expert", paper="Li et al. 2024 (MC-SMoE)")
def mc_smoe(layer: nn.Module, st: LayerStats, n_out: int, *, rank: int | None = None, sparse: float = 0.1
            ) -> tuple[list[int], dict[str, Tensor], dict[str, int]]:
    check_range("sparse", sparse, low=0.0, high=1.0)
    emap, weights = m_smoe(layer, st, n_out)
    r = rank if rank is not None else max(1, min(layer.cfg.d_ff, layer.cfg.d_model) // 4)
    check_range("rank", r, low=1)
    stored = 0
    out = {}
    for name, w_EXY in weights.items():
        mats = [low_rank_plus_sparse(w, r, sparse) for w in w_EXY]
        out[name] = torch.stack([m[0] for m in mats])
        stored += sum(m[1] for m in mats)
    return emap, out, {"stored_expert_params": int(stored)}
