"""Compute per token: executed attention and FFN sub-layers and matmul FLOPs, against the unmodified model.

FLOPs per token are 2 x the weights a token multiplies by (attention: QKV + output projections; FFN: a dense
FFN's weights, or an MoE layer's router, shared experts and k of its E routed experts; Duo's small FFN:
its weights); the attention-score FLOPs (which grow with the context) and the depth routers' own FLOPs are
left out (documented choice; the routers cost < 1% of a block here). Decisions come from each router's
``last_action`` after a forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.models.depth.drllm import DrLLMRouter
from moelab.models.depth.duo import DuoRouter
from moelab.models.depth.mindskip import MindSkipRouter


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ffn_flops(block: nn.Module) -> float:
    ffn = block.ffn
    if not block.is_moe:
        return 2.0 * _n(ffn)
    routed = _n(ffn.experts)
    return 2.0 * (_n(ffn) - routed + routed * ffn.cfg.k / ffn.cfg.num_experts)


def block_flops(model: nn.Module) -> list[tuple[float, float]]:
    """``[(attention FLOPs, FFN FLOPs)]`` per token per block of the unmodified model."""
    return [(2.0 * _n(b.attn), ffn_flops(b)) for b in model.blocks]


def sublayers(router: nn.Module, B: int, L: int) -> tuple[Tensor, Tensor]:
    """``[B, L]`` executed attention and FFN units (1 = the block's own; Duo's small FFN = its cost)."""
    a = router.last_action
    if isinstance(router, DrLLMRouter):
        x = a.float()[:, None].expand(B, L)
        return x, x
    if isinstance(router, MindSkipRouter):
        return a.float().expand(B, L), torch.ones(B, L)
    if isinstance(router, DuoRouter):
        return torch.ones(B, L), router.cost_3[a].float()
    raise TypeError(f"unknown depth router {type(router).__name__}")


def forward_cost(model: nn.Module, B: int, L: int) -> dict[str, float]:
    """Sums over the last forward's ``B x L`` tokens: attention / FFN sub-layers and FLOPs executed."""
    flops = block_flops(model)
    out = {"attn": 0.0, "ffn": 0.0, "flops": 0.0, "tokens": float(B * L)}
    for block, (fa, ff) in zip(model.blocks, flops):
        if block.depth is None:
            att, ffn = torch.ones(B, L), torch.ones(B, L)
        else:
            att, ffn = sublayers(block.depth, B, L)
        out["attn"] += float(att.sum())
        out["ffn"] += float(ffn.sum())
        out["flops"] += float((att * fa + ffn * ff).sum())
    return out
