"""ERC loss (Lv et al. 2025): the expert-router coupling loss improves the same router."""

from moelab.sweep.reproduce import Claim, Condition, register

register(Claim(
    name="erc",
    paper="Lv et al. 2025, Coupling Experts and Routers in Mixture-of-Experts via an Auxiliary Loss",
    statement="Top-2 routing with the ERC loss beats the same router without it.",
    variants=[
        {"name": "without-erc", "moe.router": "erc", "moe.aux_loss": "switch", "moe.router_kwargs": {"erc_coef": 0.0}},
        {"name": "with-erc", "moe.router": "erc", "moe.aux_loss": "switch", "moe.router_kwargs": {"erc_coef": 0.01}},
    ],
    conditions=[Condition("with-erc", "without-erc", "val_loss", "better", 0.01)],
))
