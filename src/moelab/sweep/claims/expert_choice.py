"""Expert choice vs token choice: OLMoE (Muennighoff et al. 2024) found no gain from expert choice."""

from moelab.sweep.reproduce import Claim, Condition, register

register(Claim(
    name="expert-choice",
    paper="Muennighoff et al. 2024, OLMoE: Open Mixture-of-Experts Language Models (vs Zhou et al. 2022, expert choice)",
    statement="Token-choice top-2 routing is no worse than expert-choice routing (OLMoE's ablation: no gain "
              "from expert choice), evaluated with each router's causal inference mode.",
    variants=[
        {"name": "token-choice", "moe.router": "softmax_topk", "moe.aux_loss": "switch"},
        {"name": "expert-choice", "moe.router": "expert_choice", "moe.aux_loss": "none"},
    ],
    conditions=[Condition("token-choice", "expert-choice", "val_loss", "no_worse", 0.01)],
))
