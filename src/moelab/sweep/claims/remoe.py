"""ReMoE (Wang et al. 2025): ReLU routing is at least as good as top-k at equal sparsity."""

from moelab.sweep.reproduce import Claim, Condition, register

register(Claim(
    name="remoe",
    paper="Wang et al. 2025, ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing",
    statement="ReLU routing with the adaptive L1 regulariser (targeting k=2 active experts) is no worse than "
              "top-2 softmax routing.",
    variants=[
        {"name": "top2", "moe.router": "softmax_topk", "moe.aux_loss": "switch"},
        {"name": "relu", "moe.router": "relu", "moe.aux_loss": "none"},
    ],
    conditions=[Condition("relu", "top2", "val_loss", "no_worse", 0.01)],
))
