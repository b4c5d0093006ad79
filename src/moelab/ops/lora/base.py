"""Pieces every LoRA adapter uses: the typed config, LoRA initialisation and the low-rank product, the
adapted dense FFN (frozen SwiGLU weights + per-projection deltas), a routed-mixture helper and plain
LoRA on attention linears.

Shape legend: T tokens, D model dim, F FFN hidden size, I/O a projection's input/output size,
r rank, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice, check_range
from moelab.layers.balancing import switch_aux_loss
from moelab.layers.moe import AttachAuxLoss
from moelab.ops.upcycle.dense import ffn_weights

FFN_TARGETS = ("gate", "up", "down")
ATTENTION_LINEARS = ("qkv", "o_proj", "q_proj", "k_proj", "v_proj")


@dataclass(kw_only=True)
class AdapterConfig:
    """Options of every adapter (each reads the ones it needs; the docstrings say which)."""

    adapter: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    experts: int = 4
    k: int = 2
    targets: list[str] = field(default_factory=lambda: list(FFN_TARGETS))
    attention: bool = False  # also plain LoRA on the attention projections
    aux_loss_coef: float = 0.01
    tsallis_q: float = 1.5  # DynMoLE
    entropy_threshold: float = 0.9  # DynMoLE: soft routing above this fraction of the max Tsallis entropy
    entropy_loss_coef: float = 0.01  # DynMoLE
    allocation: str = "increasing"  # MoLA: "increasing" (2-4-6-8 by depth quarter) or "uniform"
    seed: int = 0

    def validate(self) -> "AdapterConfig":
        check_range("rank", self.rank, low=1)
        check_range("alpha", self.alpha, low=0.0, low_inclusive=False)
        check_range("experts", self.experts, low=1)
        check_range("k", self.k, low=1)
        for t in self.targets:
            check_choice("targets[i]", t, FFN_TARGETS)
        check_range("aux_loss_coef", self.aux_loss_coef, low=0.0)
        check_range("tsallis_q", self.tsallis_q, low=0.0, low_inclusive=False)
        if self.tsallis_q == 1.0:
            raise MoelabError("tsallis_q=1.0 is not valid (Shannon limit); choose q != 1, e.g. 1.5 or 2")
        check_range("entropy_threshold", self.entropy_threshold, low=0.0, high=1.0)
        check_choice("allocation", self.allocation, ("increasing", "uniform"))
        return self


def check_rank(rank: int, in_dim: int, out_dim: int, where: str) -> None:
    if rank > min(in_dim, out_dim):
        raise MoelabError(f"rank={rank} is larger than the layer's dimension min(in, out)={min(in_dim, out_dim)} "
                          f"of {where}; choose rank <= {min(in_dim, out_dim)}")


def lora_pair(n: int | None, r: int, in_dim: int, out_dim: int) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA factors (Hu et al. 2021): A ``[(n,) r, I]`` Kaiming-uniform (as PEFT), B ``[(n,) O, r]`` zero, so
    the delta B A starts at zero."""
    lead = () if n is None else (n,)
    A = torch.empty(*lead, r, in_dim)
    bound = 1.0 / math.sqrt(in_dim)  # kaiming_uniform_(a=sqrt(5)) on an [r, I] matrix
    nn.init.uniform_(A, -bound, bound)
    return nn.Parameter(A), nn.Parameter(torch.zeros(*lead, out_dim, r))


def topk_weights(probs_TE: Tensor, k: int) -> Tensor:
    """Top-k of ``probs_TE`` renormalised to sum 1, zeros elsewhere (dense ``[T, E]``)."""
    idx_TK = probs_TE.detach().topk(k, dim=-1).indices
    w_TK = probs_TE.gather(1, idx_TK)
    return torch.zeros_like(probs_TE).scatter(1, idx_TK, w_TK / w_TK.sum(-1, keepdim=True))


def balance(probs_TE: Tensor, w_TE: Tensor, coef: float) -> Tensor:
    """Switch balance loss (1 at balance) times ``coef``, counts = tokens routed to each expert."""
    return coef * switch_aux_loss(probs_TE, (w_TE.detach() > 0).sum(0).float())


class Router(nn.Module):
    """A linear router in fp32 (as moelab's ``GateLinear``), N(0, 0.02) init."""

    def __init__(self, in_dim: int, n: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, in_dim, generator=generator) * 0.02)

    def forward(self, x_TI: Tensor) -> Tensor:
        return torch.softmax(F.linear(x_TI.float(), self.weight.float()), dim=-1)


class AdaptedFFN(nn.Module):
    """A frozen dense SwiGLU FFN (``base``) plus a delta module per projection (``deltas``; absent = none):
    ``down(silu(gate x + dg(x)) * (up x + du(x))) + dd(h)``. Each delta may leave differentiable
    balance losses in ``delta.aux`` (dict); they are attached to the output (Megatron's
    ``MoEAuxLossAutoScaler``, as ``MoELayer``), scaled by ``aux_loss_scale``; ``last_aux`` keeps them detached.
    """

    def __init__(self, base: nn.Module, deltas: dict[str, nn.Module]) -> None:
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict(deltas)
        self.aux_loss_scale = 1.0
        self.last_aux: dict[str, Tensor] = {}

    def _delta(self, name: str, x: Tensor) -> Tensor | float:
        return self.deltas[name](x) if name in self.deltas else 0.0

    def forward(self, x: Tensor) -> Tensor:
        w = ffn_weights(self.base)
        x_TD = x.reshape(-1, x.shape[-1])
        g_TF = F.linear(x_TD, w.w_gate_FD) + self._delta("gate", x_TD)
        u_TF = F.linear(x_TD, w.w_up_FD) + self._delta("up", x_TD)
        h_TF = F.silu(g_TF) * u_TF
        y_TD = F.linear(h_TF, w.w_down_DF) + self._delta("down", h_TF)
        aux = {f"{n}.{k}": v for n, d in self.deltas.items() for k, v in getattr(d, "aux", {}).items()}
        return attach_aux(self, y_TD, aux).reshape(x.shape)


def attach_aux(module: nn.Module, y: Tensor, aux: dict[str, Tensor]) -> Tensor:
    module.last_aux = {n: v.detach() for n, v in aux.items()}
    if aux and torch.is_grad_enabled():
        total = sum(v.float() for v in aux.values())
        if total.requires_grad:
            return AttachAuxLoss.apply(y, total, module.aux_loss_scale)
    return y


def projection_dims(base: nn.Module) -> dict[str, tuple[int, int]]:
    w = ffn_weights(base)
    return {"gate": (w.d_model, w.d_ff), "up": (w.d_model, w.d_ff), "down": (w.d_ff, w.d_model)}


def build_projection_adapter(base: nn.Module, cfg: AdapterConfig, make) -> AdaptedFFN:
    """``AdaptedFFN`` with ``make(name, in_dim, out_dim)`` on each of ``cfg.targets``."""
    dims = projection_dims(base)
    for t in cfg.targets:
        check_rank(cfg.rank, *dims[t], where=f"FFN projection {t!r}")
    return AdaptedFFN(base, {t: make(t, *dims[t]) for t in cfg.targets})


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus LoRA: ``base(x) + (alpha / r) B A x`` (attention projections)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        check_rank(rank, base.in_features, base.out_features, where="an attention projection")
        self.base, self.scale = base, alpha / rank
        self.A_rI, self.B_Or = lora_pair(None, rank, base.in_features, base.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.A_rI), self.B_Or)

    def delta_weight(self) -> Tensor:
        return self.scale * self.B_Or @ self.A_rI
