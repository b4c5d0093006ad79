"""Helpers shared by the ops tests."""

from __future__ import annotations

from torch import nn

from moelab.layers.config import MoEConfig


class Stack(nn.Module):
    """Not a MoETransformer: embedding -> MoE layers (residual) -> head; found by scanning the tree."""

    def __init__(self, layers: list[nn.Module], vocab: int = 32) -> None:
        super().__init__()
        d = layers[0].cfg.d_model
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        self.blocks = nn.ModuleList(layers)

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = h + b(h)
        return type("Out", (), {"logits": self.head(h)})()


def moe_cfg(**kw) -> MoEConfig:
    base = dict(d_model=16, d_ff=8, num_experts=8, k=2, dispatch="loop")
    base.update(kw)
    return MoEConfig(**base)


