"""Dispatch backends: ``fn(x_TD, routing, experts) -> y_TD`` with y = sum over kept slots of
weight * expert(x). Every backend handles any number of experts per token (CSR slots, no
padding to the maximum), experts with no tokens and dropped slots (``keep_S``).

| name       | what                                                        | use                     |
|------------|-------------------------------------------------------------|-------------------------|
| ``loop``   | per-expert Python loop, plain autograd                       | the oracle              |
| ``sorted`` | argsort + gather + ``torch.mm`` per expert + index_add        | any dtype / shape       |
| ``grouped``| argsort + gather + ``torch.nn.functional.grouped_mm``         | default (CPU and CUDA)  |
| ``capacity``| kept slots of ``apply_capacity`` on the fastest dropless one | token dropping          |

``pick_dispatcher("auto", device)`` picks ``grouped`` on every device: measured on the 2-core
CPU (benchmarks/results/moe_layer.json) it is the fastest correct backend at both benchmark
shapes, and on CUDA it is the native grouped GEMM. ``grouped`` itself falls back to per-expert
``torch.mm`` for inputs the kernel rejects (fp64, unaligned strides).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from moelab.errors import MoelabError
from moelab.registry import Registry
from moelab.layers.dispatch.capacity import DROP_POLICIES, apply_capacity, capacity_dispatch, expert_capacity
from moelab.layers.dispatch.grouped import grouped_dispatch
from moelab.layers.dispatch.loop import loop_dispatch
from moelab.layers.dispatch.sorted import sorted_dispatch

DispatchFn = Callable[..., Tensor]

DISPATCHERS: Registry[DispatchFn] = Registry("dispatch backend")
DISPATCHERS.register("loop", description="per-expert Python loop (reference oracle)")(loop_dispatch)
DISPATCHERS.register(
    "sorted", description="stable argsort by expert, gather, per-expert mm, index_add",
    paper="torchtitan GroupedExperts for-loop path; MegaBlocks dMoE (Gale et al. 2022)",
)(sorted_dispatch)
DISPATCHERS.register(
    "grouped", description="sorted dispatch with torch grouped_mm",
    paper="torchtitan GroupedExperts (torch._grouped_mm)",
)(grouped_dispatch)
DISPATCHERS.register(
    "capacity", description="capacity-factor token dropping, kept slots on the fastest dropless backend",
    paper="GShard (Lepikhin et al. 2020); Switch Transformers (Fedus et al. 2021)",
)(capacity_dispatch)

AUTO_CHOICE = {"cpu": "grouped", "cuda": "grouped"}


def pick_dispatcher(name: str, device: torch.device | str | None = None) -> DispatchFn:
    """The backend called ``name``; ``"auto"`` is the fastest correct one for ``device``."""
    if name == "auto":
        dev = torch.device(device if device is not None else "cpu")
        return DISPATCHERS.get(AUTO_CHOICE.get(dev.type, "sorted"))
    if name not in DISPATCHERS:
        raise MoelabError(
            f"dispatch={name!r} is not valid; choose one of: {', '.join(map(repr, ['auto', *DISPATCHERS.names()]))}"
        )
    return DISPATCHERS.get(name)



__all__ = [
    "DISPATCHERS", "DROP_POLICIES", "apply_capacity", "expert_capacity", "pick_dispatcher",
    "loop_dispatch", "sorted_dispatch", "grouped_dispatch", "capacity_dispatch",
]
