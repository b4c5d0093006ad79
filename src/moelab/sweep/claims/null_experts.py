"""AdaMoE (Zeng et al. 2024): null experts give fewer real experts per token at equal loss."""

from moelab.sweep.reproduce import Claim, Condition, register

register(Claim(
    name="null-experts",
    paper="Zeng et al. 2024, AdaMoE: Token-Adaptive Routing with Null Experts for MoE Language Models",
    statement="Top-k over real plus null (zero-compute) experts uses fewer real experts per token than top-2 "
              "at equal loss.",
    variants=[
        {"name": "top2", "moe.router": "softmax_topk", "moe.aux_loss": "switch"},
        {"name": "null-experts", "moe.router": "null_experts", "moe.aux_loss": "none"},
    ],
    conditions=[
        Condition("null-experts", "top2", "experts_per_token", "better", 0.1),
        Condition("null-experts", "top2", "val_loss", "no_worse", 0.01),
    ],
))
