"""UniPool (Huang et al. 2026): a shared pool of 41.6-66.7% of the vanilla expert budget matches vanilla."""

from moelab.sweep.reproduce import Claim, Condition, register

_POOL = {"moe.router": "norm", "moe.aux_loss": "none", "layout.kind": "shared_pool", "layout.pool_loss_coef": 0.01,
         "layout.pool_loss_mode": "lagged"}

register(Claim(
    name="unipool",
    paper="Huang et al. 2026, UniPool: A Globally Shared Expert Pool for Mixture-of-Experts (arXiv:2605.06665)",
    statement="A globally shared expert pool of 41.6-66.7% of the vanilla per-layer expert budget, with "
              "per-layer NormRouters and the pool-level balance loss, is no worse than vanilla MoE; vanilla with "
              "NormRouter is the control for the router change.",
    variants=[
        {"name": "vanilla", "moe.aux_loss": "switch"},
        {"name": "vanilla-norm", "moe.router": "norm", "moe.aux_loss": "switch"},
        {"name": "unipool-100", **_POOL, "layout.pool_fraction": 1.0},
        {"name": "unipool-66.7", **_POOL, "layout.pool_fraction": 2 / 3},
        {"name": "unipool-50", **_POOL, "layout.pool_fraction": 0.5},
    ],
    conditions=[
        Condition("unipool-66.7", "vanilla", "val_loss", "no_worse", 0.01),
        Condition("unipool-50", "vanilla", "val_loss", "no_worse", 0.01),
        Condition("unipool-66.7", "vanilla-norm", "val_loss", "no_worse", 0.01),
        Condition("unipool-50", "vanilla-norm", "val_loss", "no_worse", 0.01),
    ],
    notes="Margin 0.01 nats of val loss (about 1% perplexity). The pool's loss is UniPool's form for NormRouter.",
))
