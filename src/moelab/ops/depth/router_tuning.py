"""Router-Tuning with MindSkip (He et al. 2024, "Router-Tuning: A Simple and Effective Approach for Enabling
Dynamic-Depth in Transformers"): a router per attention block decides to skip it; only the routers are
trained, on a small dataset, with the rest of the model frozen.

As in the official code (CASE-Lab-UMD/Router-Tuning-Mixture-of-Depths, ``utils/model/model_patch.py``):
routers ``Linear(D, 1, bias=False)`` (PyTorch's default init, seeded), hard 0/1 keep-masks with a
straight-through gradient, and the capacity loss ``relu(capacity - target) x gradient_scale`` per layer
added to the LM loss, with target = ``budget`` (the fraction of attention blocks executed). Options:
``granularity`` "sequence" (official default ``attn_sequence``; decided from the prompt) | "token",
``threshold`` (0.5), ``gradient_scale`` (ours: 1.0; the official default 0 disables the loss).
Training data: ``train_windows`` windows of the run's train split; the LM loss is the continuation's (the
prompt is what a sequence router reads); AdamW at ``lr`` for ``steps`` steps of ``batch_size`` windows.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.models.depth import depth_routers
from moelab.ops.depth.base import DEPTH_METHODS, DepthConfig, Windows, continuation_losses, freeze_all_but


def router_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for r in depth_routers(model) for p in r.gate.parameters()]


def capacity_loss(model: nn.Module, target: float, scale: float) -> torch.Tensor:
    """Sum over layers of ``relu(mean keep-mask - target) x scale`` (the mask carries the STE gradient)."""
    total = torch.zeros(())
    for r in depth_routers(model):
        if r.last_scores is not None:
            hard = (r.last_scores >= r.threshold).float()
            m = hard + r.last_scores - r.last_scores.detach()
            total = total + torch.relu(m.mean() - target) * scale
    return total


def train_step(model: nn.Module, ids_BL, P: int, opt, target: float, scale: float) -> tuple[float, float]:
    for r in depth_routers(model):
        r.last_scores = None
    lm = continuation_losses(model, ids_BL, P).mean()
    cap = capacity_loss(model, target, scale)
    opt.zero_grad()
    (lm + cap).backward()
    opt.step()
    return float(lm.detach()), float(cap.detach())


@DEPTH_METHODS.register("router_tuning", description="MindSkip attention-skip routers, only the routers trained",
                        paper="He et al. 2024 (Router-Tuning / MindSkip)")
class RouterTuning:
    budget_unit = "attention blocks executed per token (fraction)"

    def spec(self, model: nn.Module, cfg: DepthConfig) -> dict:
        o = cfg.options
        return {"method": "router_tuning", "granularity": o.get("granularity", "sequence"),
                "threshold": float(o.get("threshold", 0.5))}

    def fit(self, model: nn.Module, data: Windows, cfg: DepthConfig) -> dict:
        params = freeze_all_but(model, router_params(model))
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        scale = float(cfg.options.get("gradient_scale", 1.0))
        g = torch.Generator().manual_seed(cfg.seed)
        model.eval()  # the frozen model stays in eval mode; only the routers train (their STE path)
        for r in depth_routers(model):
            r.train()
        hist = []
        for _ in range(cfg.steps):
            idx = torch.randint(0, data.ids_NL.shape[0], (cfg.batch_size,), generator=g)
            hist.append(train_step(model, data.ids_NL[idx], data.prompt_len, opt, cfg.budget, scale))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        last = hist[-10:]
        return {"trainable_params": sum(p.numel() for p in params), "gradient_scale": scale,
                "final_lm_loss": sum(h[0] for h in last) / len(last),
                "final_capacity_loss": sum(h[1] for h in last) / len(last)}
