"""A minimal MoE layer with the ``moelab.layers.moe.MoELayer`` interface, for tests only.

Softmax top-k routing over E SwiGLU experts (plain loop), a Switch balance loss attached to the
output's autograd graph (scaled by ``aux_loss_scale``), and ``last_aux``/``last_stats``/
``last_routing``/``last_ctx`` after each forward. ``attach=False`` instead keeps the non-detached
aux loss in ``aux_graph`` so a test can add it to the objective by hand (the oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, aux, scale):
        ctx.scale = scale
        return y.clone()

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y, torch.full((), ctx.scale, dtype=torch.float32), None


class StandinExperts(nn.Module):
    def __init__(self, E, D, F_):
        super().__init__()
        self.w_gate_EFD = nn.Parameter(torch.randn(E, F_, D) * 0.02)
        self.w_up_EFD = nn.Parameter(torch.randn(E, F_, D) * 0.02)
        self.w_down_EDF = nn.Parameter(torch.randn(E, D, F_) * 0.02)


class StandinMoE(nn.Module):
    def __init__(self, cfg, attach=True):
        super().__init__()
        self.cfg = cfg
        self.attach = attach
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = StandinExperts(cfg.num_experts, cfg.d_model, cfg.d_ff)
        self.aux_loss_scale = 1.0
        self.last_aux, self.last_stats, self.last_routing, self.last_ctx = {}, {}, None, None
        self.aux_graph = None

    def forward(self, x_TD, ctx=None):
        self.last_ctx = ctx
        E, K = self.cfg.num_experts, self.cfg.k
        probs_TE = F.softmax(self.router(x_TD).float(), dim=-1)
        w_TK, idx_TK = probs_TE.topk(K, dim=-1)
        y_TD = torch.zeros_like(x_TD)
        ex = self.experts
        for e in range(E):
            tok, slot = (idx_TK == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = F.silu(x_TD[tok] @ ex.w_gate_EFD[e].T) * (x_TD[tok] @ ex.w_up_EFD[e].T)
            y_TD = y_TD.index_add(0, tok, (h @ ex.w_down_EDF[e].T) * w_TK[tok, slot, None].to(x_TD.dtype))
        frac_E = torch.bincount(idx_TK.reshape(-1), minlength=E).float() / idx_TK.numel()
        aux = self.cfg.aux_loss_coef * E * (frac_E * probs_TE.mean(0)).sum()
        counts = torch.bincount(idx_TK.reshape(-1), minlength=E)
        self.last_aux = {"switch": aux.detach()}
        self.last_stats = {"counts": counts.tolist(), "load_max_over_mean": float(counts.max() / counts.float().mean()),
                           "load_cv": float(counts.float().std(unbiased=False) / counts.float().mean())}
        self.last_routing = idx_TK.detach()
        if self.attach:
            return _Attach.apply(y_TD, aux, self.aux_loss_scale)
        self.aux_graph = aux
        return y_TD


def install_standin(monkeypatch, attach=True):
    """Make MoETransformer build StandinMoE layers by default."""
    import moelab.models.transformer as tr

    monkeypatch.setattr(tr, "_default_moe_factory", lambda cfg: StandinMoE(cfg, attach=attach))
