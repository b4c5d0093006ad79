"""``grouped``: sorted dispatch whose per-expert GEMMs are one ``torch.nn.functional.grouped_mm``.

torchtitan's ``GroupedExperts`` (``torch._grouped_mm(x, w, offs=cumsum(counts))``); torch 2.13
runs it on CPU too. When the kernel cannot take the input (fp64, or a row stride that is not a
multiple of 16 bytes, e.g. D=101 in fp32) the same computation runs with per-expert ``torch.mm``
(the ``sorted`` backend), so ``grouped`` accepts every input the other backends accept.
"""

from __future__ import annotations

from torch import Tensor

from moelab.layers.dispatch._grouped_ffn import LoopGemm, TorchGroupedGemm, grouped_ffn
from moelab.layers.experts import ExpertBank
from moelab.layers.routing import RoutingResult


def grouped_dispatch(x_TD: Tensor, routing: RoutingResult, experts: ExpertBank) -> Tensor:
    gemm = TorchGroupedGemm if TorchGroupedGemm.supports(x_TD, experts.d_ff) else LoopGemm
    return grouped_ffn(x_TD, routing, experts, gemm)
