"""Small helpers shared by the router-zoo-1 routers (adaptive-compute and geometric routers).

No registrations here. Shape legend: T tokens, D model dim, E experts, K top-k, P projection dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.errors import MoelabError
from moelab.layers.routing import RoutingContext


def valid_T(ctx: RoutingContext | None, T: int, device: torch.device) -> Tensor:
    """Bool ``[T]``: True for real tokens (all True when the context has no mask)."""
    v = None if ctx is None else ctx.valid_T
    if v is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    v = v.reshape(-1).to(device=device, dtype=torch.bool)
    if v.numel() != T:
        raise MoelabError(f"ctx.valid_T has {v.numel()} entries, expected T={T}")
    return v


def ctx_valid_or_none(ctx: RoutingContext | None) -> Tensor | None:
    """The context's valid mask flattened to ``[T]`` (None when absent), for RoutingResult.valid_T."""
    if ctx is None or ctx.valid_T is None:
        return None
    return ctx.valid_T.reshape(-1).bool()


def masked_mean(v_T: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``v_T`` over real tokens (0 when there are none); differentiable."""
    w = valid.to(v_T.dtype)
    return (v_T * w).sum() / w.sum().clamp_min(1.0)


def entropy_T(probs_TE: Tensor, eps: float = 1e-9) -> Tensor:
    """Shannon entropy (nats) of each row of a probability matrix."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(eps))).sum(-1)


def check_int(param: str, value: int, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and value >= low and (high is None or value <= high)
    if not ok:
        hi = "" if high is None else f" and <= {high}"
        raise MoelabError(f"{param}={value!r} is out of range; expected an integer >= {low}{hi}")
    return value


def cosine_TE(x_TP: Tensor, c_EP: Tensor, eps: float = 1e-6) -> Tensor:
    """Cosine similarity of every row of ``x`` with every row of ``c`` (fp32)."""
    return F.normalize(x_TP.float(), dim=-1, eps=eps) @ F.normalize(c_EP.float(), dim=-1, eps=eps).t()
