"""``sorted``: stable argsort by expert, gather, one ``torch.mm`` per expert, scatter-add.

The pure-PyTorch dropless path of torchtitan (``_local_reorder`` + for-loop experts) and
MegaBlocks' dMoE without block-sparse kernels; the gather/FFN/scatter is one autograd
Function (see ``_grouped_ffn``). Works for every dtype and every D, F.
"""

from __future__ import annotations

from torch import Tensor

from moelab.layers.dispatch._grouped_ffn import LoopGemm, grouped_ffn
from moelab.layers.experts import ExpertBank
from moelab.layers.routing import RoutingResult


def sorted_dispatch(x_TD: Tensor, routing: RoutingResult, experts: ExpertBank) -> Tensor:
    return grouped_ffn(x_TD, routing, experts, LoopGemm)
