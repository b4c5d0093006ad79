"""Expert banks with options the stacked ``ExpertBank`` lacks: per-expert biases and GPT-OSS's
clamped SwiGLU.

Shape legend: T tokens, N rows given to one expert, D model dim, F expert hidden dim, E experts, S slots.

:class:`BiasedExpertBank` (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"; the reference
code ``gpt_oss/torch/model.py`` ``swiglu`` and Hugging Face ``GptOssExperts``)::

    g = x W_gate^T + b_gate,  u = x W_up^T + b_up
    g = clamp(g, max=limit),  u = clamp(u, -limit, limit)          (limit=None: no clamp)
    h = g * sigmoid(alpha * g) * (u + up_shift)
    y = h W_down^T + b_down

``alpha=1, limit=None, up_shift=0`` with zero biases is exactly the plain SwiGLU of ``ExpertBank``
(silu(g) = g * sigmoid(g)). GPT-OSS uses ``alpha=1.702, limit=7.0, up_shift=1``.

The bank duck-types ``ExpertBank`` (``w_gate_EFD``, ``w_up_EFD``, ``w_down_EDF``, ``num_experts``,
``d_model``, ``d_ff``, ``activation``, ``gated``) and adds ``forward_routed(x_TD, routing)``, which
``MoELayer.dispatch`` uses instead of the dispatch backends (they know neither biases nor clamps).
``forward_routed`` sorts the kept slots by expert and runs one matmul per used expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routing import RoutingResult


class BiasedExpertBank(nn.Module):
    """E SwiGLU experts with biases and an optional clamp (see the module docstring)."""

    def __init__(self, cfg: MoEConfig, *, alpha: float = 1.0, limit: float | None = None,
                 up_shift: float = 0.0) -> None:
        super().__init__()
        if cfg.activation != "swiglu":
            raise MoelabError(f"activation={cfg.activation!r} is not valid for BiasedExpertBank; choose 'swiglu'")
        check_range("alpha", alpha, low=0.0, low_inclusive=False)
        if limit is not None:
            check_range("limit", limit, low=0.0, low_inclusive=False)
        E, Fh, D = cfg.num_experts, cfg.d_ff, cfg.d_model
        self.num_experts, self.d_ff, self.d_model = E, Fh, D
        self.activation, self.gated = "swiglu", True
        self.alpha, self.limit, self.up_shift = float(alpha), limit, float(up_shift)
        self.w_gate_EFD = nn.Parameter(torch.randn(E, Fh, D) * cfg.init_std)
        self.w_up_EFD = nn.Parameter(torch.randn(E, Fh, D) * cfg.init_std)
        self.w_down_EDF = nn.Parameter(torch.randn(E, D, Fh) * cfg.init_std)
        self.b_gate_EF = nn.Parameter(torch.zeros(E, Fh))
        self.b_up_EF = nn.Parameter(torch.zeros(E, Fh))
        self.b_down_ED = nn.Parameter(torch.zeros(E, D))

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.d_model}, F={self.d_ff}, alpha={self.alpha}, limit={self.limit}"

    def expert(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert ``e`` on the rows ``x_ND`` (the formula of the module docstring)."""
        g_NF = F.linear(x_ND, self.w_gate_EFD[e], self.b_gate_EF[e])
        u_NF = F.linear(x_ND, self.w_up_EFD[e], self.b_up_EF[e])
        if self.limit is not None:
            g_NF = g_NF.clamp(max=self.limit)
            u_NF = u_NF.clamp(min=-self.limit, max=self.limit)
        h_NF = g_NF * torch.sigmoid(self.alpha * g_NF) * (u_NF + self.up_shift)
        return F.linear(h_NF, self.w_down_EDF[e], self.b_down_ED[e])

    def forward_routed(self, x_TD: Tensor, routing: RoutingResult) -> Tensor:
        """``y_t = sum over kept slots s of token t: weight_s * expert_{e_s}(x_t)``."""
        r = routing.kept()
        order_S = torch.argsort(r.expert_S, stable=True)
        tok_S, exp_S, w_S = r.token_S[order_S], r.expert_S[order_S], r.weight_S[order_S]
        counts = torch.bincount(exp_S, minlength=self.num_experts).tolist()
        y_TD = torch.zeros_like(x_TD)
        start = 0
        for e, n in enumerate(counts):
            if n:
                t = tok_S[start:start + n]
                out = self.expert(x_TD[t], e) * w_S[start:start + n, None].to(x_TD.dtype)
                y_TD = y_TD.index_add(0, t, out)
                start += n
        return y_TD
