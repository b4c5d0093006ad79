"""Chain-of-Experts (Wang et al. 2025): two iterations of k/2 beat one of k at equal compute."""

from moelab.sweep.reproduce import Claim, Condition, register

register(Claim(
    name="chain-of-experts",
    paper="Wang et al. 2025, Chain-of-Experts: Unlocking the Communication Power of MoE Models",
    statement="Two sequential routing iterations of k/2=1 expert each beat one iteration of k=2 at equal compute.",
    variants=[
        {"name": "one-iteration-k2", "moe.router": "softmax_topk", "moe.aux_loss": "switch"},
        {"name": "coe-2x-k1", "moe.router": "chain_of_experts", "moe.aux_loss": "switch",
         "moe.router_kwargs": {"n_iters": 2}},
    ],
    conditions=[Condition("coe-2x-k1", "one-iteration-k2", "val_loss", "better", 0.01)],
))
