"""DeepSeek-V3 auxiliary-loss-free balancing: better balance than the Switch loss at equal loss."""

from moelab.sweep.reproduce import Claim, Condition, register

_NONE = {"moe.router": "softmax_topk", "moe.aux_loss": "none", "moe.aux_free_bias": False, "moe.z_loss_coef": 0.0}

register(Claim(
    name="aux-free",
    paper="Wang et al. 2024, Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts (DeepSeek-V3)",
    statement="The auxiliary-loss-free selection bias balances expert load better than the Switch aux loss at "
              "equal or better loss.",
    variants=[
        {"name": "switch-aux", **_NONE, "moe.aux_loss": "switch", "moe.aux_loss_coef": 0.01},
        {"name": "aux-free-bias", **_NONE, "moe.aux_free_bias": True, "moe.bias_update_rate": 0.001},
    ],
    conditions=[
        Condition("aux-free-bias", "switch-aux", "load_max_over_mean", "better", 0.02),
        Condition("aux-free-bias", "switch-aux", "val_loss", "no_worse", 0.01),
    ],
))
