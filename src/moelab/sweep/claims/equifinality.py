"""Equifinality (Ternovtsii & Bilak 2026): cosine routing is equivalent to linear; random routing loses."""

from moelab.sweep.reproduce import Claim, Condition, register

register(Claim(
    name="equifinality",
    paper="Ternovtsii & Bilak 2026, Equifinality in Mixture of Experts (arXiv:2604.14419)",
    statement="Cosine routing is equivalent to the learned linear router within the TOST margin, and the linear "
              "router beats frozen random routing.",
    variants=[
        {"name": "linear", "moe.router": "softmax_topk", "moe.aux_loss": "switch"},
        {"name": "cosine", "moe.router": "cosine", "moe.aux_loss": "switch"},
        {"name": "random-fixed", "moe.router": "random_fixed", "moe.aux_loss": "none"},
    ],
    conditions=[
        Condition("cosine", "linear", "val_loss", "equivalent", 0.01),
        Condition("linear", "random-fixed", "val_loss", "better", 0.01),
    ],
))
