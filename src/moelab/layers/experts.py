"""Routed experts stored as stacked 3-D weights, and DeepSeekMoE shared experts.

Shape legend: T tokens, N rows given to one expert, D model dim, F expert hidden dim, E experts.

Weights are stored ``[E, out, in]`` (the layout of ``nn.Linear.weight`` stacked over experts,
as torchtitan's ``GroupedExperts`` and Hugging Face's ``MixtralExperts``), so one expert is
``F.linear(x, w[e])``:

- SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): ``w_down @ (silu(w_gate @ x) * (w_up @ x))``
  with ``w_gate_EFD``, ``w_up_EFD``, ``w_down_EDF``.
- GELU: ``w_down @ gelu(w_up @ x)`` with ``w_up_EFD``, ``w_down_EDF`` (``w_gate_EFD`` is None).

Init (documented choice): every input projection is ``normal(0, cfg.init_std)``; the output
projection ``w_down`` is ``normal(0, cfg.init_std / sqrt(2 * num_layers))``, the GPT-2 /
Megatron "scaled init" for projections that write into the residual stream. ``num_layers``
defaults to 1 (a lone layer), i.e. ``init_std / sqrt(2)``; models pass their depth.

Fine-grained expert segmentation (DeepSeekMoE, Dai et al. 2024) is a config transformation:
``MoEConfig.fine_grained(m)`` gives m times more experts of width d_ff/m with k*m active.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice, check_range
from moelab.layers.config import MoEConfig

ACTIVATIONS = ("swiglu", "gelu")


def _check_cfg(cfg: MoEConfig) -> None:
    check_choice("activation", cfg.activation, ACTIVATIONS)
    for name in ("d_model", "d_ff", "num_experts"):
        check_range(name, getattr(cfg, name), low=1)
    check_range("init_std", cfg.init_std, low=0.0, low_inclusive=False)


class ExpertBank(nn.Module):
    """E routed experts as stacked weights (``w_gate_EFD``, ``w_up_EFD``, ``w_down_EDF``).

    The bank owns no routing and no dispatch: dispatch backends read the stacked weights, and
    the UniPool shared pool passes one bank to many MoE layers.
    """

    def __init__(self, cfg: MoEConfig, *, num_layers: int = 1) -> None:
        super().__init__()
        _check_cfg(cfg)
        check_range("num_layers", num_layers, low=1)
        E, Fh, D = cfg.num_experts, cfg.d_ff, cfg.d_model
        self.num_experts, self.d_ff, self.d_model = E, Fh, D
        self.activation = cfg.activation
        self.gated = cfg.activation == "swiglu"
        self.init_std = cfg.init_std
        self.down_std = cfg.init_std / math.sqrt(2 * num_layers)
        self.w_gate_EFD = nn.Parameter(torch.empty(E, Fh, D)) if self.gated else None
        self.w_up_EFD = nn.Parameter(torch.empty(E, Fh, D))
        self.w_down_EDF = nn.Parameter(torch.empty(E, D, Fh))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.w_gate_EFD is not None:
                self.w_gate_EFD.normal_(0.0, self.init_std)
            self.w_up_EFD.normal_(0.0, self.init_std)
            self.w_down_EDF.normal_(0.0, self.down_std)

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.d_model}, F={self.d_ff}, activation={self.activation}"


def _ffn(x_ND: Tensor, w_gate_FD: Tensor | None, w_up_FD: Tensor, w_down_DF: Tensor) -> Tensor:
    if w_gate_FD is None:
        h_NF = F.gelu(F.linear(x_ND, w_up_FD))
    else:
        h_NF = F.silu(F.linear(x_ND, w_gate_FD)) * F.linear(x_ND, w_up_FD)
    return F.linear(h_NF, w_down_DF)


def expert_forward(experts: ExpertBank, x_ND: Tensor, e: int) -> Tensor:
    """Expert ``e`` applied to the rows ``x_ND`` (the obvious formula; the loop backend's oracle)."""
    if not 0 <= int(e) < experts.num_experts:
        raise MoelabError(f"expert index e={e} is out of range; expected 0 <= e < {experts.num_experts}")
    wg = None if experts.w_gate_EFD is None else experts.w_gate_EFD[e]
    return _ffn(x_ND, wg, experts.w_up_EFD[e], experts.w_down_EDF[e])


class SharedExperts(nn.Module):
    """DeepSeekMoE shared experts: ``cfg.num_shared_experts`` FFNs that every token uses.

    Dai et al. 2024 ("DeepSeekMoE: Towards Ultimate Expert Specialization"): shared experts are
    always active and their output is added to the routed output. n shared experts of width f
    summed equal one FFN of width n*f (the hidden units are independent), so they are stored
    fused as ``w_*_FD`` with F = n * (cfg.shared_d_ff or cfg.d_ff).

    With ``cfg.shared_expert_gate`` the output is multiplied by ``sigmoid(x @ w_gate_1D^T)``
    per token, as Qwen2-MoE's ``shared_expert_gate`` (a Linear(D, 1) without bias).
    Init as ``ExpertBank`` (down projection scaled by 1/sqrt(2*num_layers)); the gate
    vector starts at normal(0, init_std).
    """

    def __init__(self, cfg: MoEConfig, *, num_layers: int = 1) -> None:
        super().__init__()
        _check_cfg(cfg)
        check_range("num_shared_experts", cfg.num_shared_experts, low=1)
        f = cfg.shared_d_ff if cfg.shared_d_ff is not None else cfg.d_ff
        check_range("shared_d_ff", f, low=1)
        Fh, D = cfg.num_shared_experts * f, cfg.d_model
        self.d_ff, self.d_model = Fh, D
        self.init_std = cfg.init_std
        self.down_std = cfg.init_std / math.sqrt(2 * num_layers)
        gated = cfg.activation == "swiglu"
        self.w_gate_FD = nn.Parameter(torch.empty(Fh, D)) if gated else None
        self.w_up_FD = nn.Parameter(torch.empty(Fh, D))
        self.w_down_DF = nn.Parameter(torch.empty(D, Fh))
        self.w_sgate_1D = nn.Parameter(torch.empty(1, D)) if cfg.shared_expert_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for w in (self.w_gate_FD, self.w_up_FD, self.w_sgate_1D):
                if w is not None:
                    w.normal_(0.0, self.init_std)
            self.w_down_DF.normal_(0.0, self.down_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        y_TD = _ffn(x_TD, self.w_gate_FD, self.w_up_FD, self.w_down_DF)
        if self.w_sgate_1D is not None:
            y_TD = torch.sigmoid(F.linear(x_TD, self.w_sgate_1D)) * y_TD
        return y_TD
