"""Harder Tasks Need More Experts (Huang et al. 2024): top-p routing uses fewer experts at equal loss."""

from moelab.sweep.reproduce import Claim, Condition, register

register(Claim(
    name="top-p",
    paper="Huang et al. 2024, Harder Tasks Need More Experts: Dynamic Routing in MoE Models",
    statement="Dynamic top-p routing (p=0.4) activates fewer experts per token than top-2 at equal or better loss.",
    variants=[
        {"name": "top2", "moe.router": "softmax_topk", "moe.aux_loss": "switch"},
        {"name": "top-p", "moe.router": "top_p", "moe.aux_loss": "switch", "moe.router_kwargs": {"p": 0.4}},
    ],
    conditions=[
        Condition("top-p", "top2", "experts_per_token", "better", 0.1),
        Condition("top-p", "top2", "val_loss", "no_worse", 0.01),
    ],
))
