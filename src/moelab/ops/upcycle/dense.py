"""The dense-FFN seam: what upcycling and LoRA recipes rely on to find and replace a model's dense
feed-forward blocks (the dense counterpart of :mod:`moelab.models.moe_protocol`).

- :func:`dense_ffn_sites(model)` -> list of :class:`DenseSite` (block index, the FFN module, where it
  sits) in depth order. A dense FFN is a moelab ``DenseFFN`` (fused ``w_gate_up`` + ``w_down``) or any
  module with ``gate_proj``/``up_proj``/``down_proj`` linears (Hugging Face LLaMA/Mistral/Qwen MLPs).
  The block index is the parent's ``layer_index`` (moelab) or ``layer_idx`` (HF) attribute, else the order.
- :func:`ffn_weights(module)` -> :class:`DenseWeights` (``w_gate_FD``, ``w_up_FD``, ``w_down_DF``): views of
  the FFN's SwiGLU weights, whatever its layout.
- :func:`replace_dense_ffn(model, index, new)` puts ``new`` where block ``index``'s FFN is. When the parent
  has an ``is_moe`` flag (moelab's ``Block``, which then passes the routing context to its FFN), the flag
  is set to whether ``new`` is an ``MoELayer``; ``new.layer_index`` is set to the block index.

Shape legend: D model dim, F FFN hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moelab.errors import MoelabError


@dataclass
class DenseSite:
    index: int
    module: nn.Module
    parent: nn.Module
    attr: str


@dataclass
class DenseWeights:
    """SwiGLU weights of one dense FFN: ``down(silu(gate x) * (up x))``."""

    w_gate_FD: Tensor
    w_up_FD: Tensor
    w_down_DF: Tensor

    @property
    def d_model(self) -> int:
        return self.w_up_FD.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w_up_FD.shape[0]


def is_dense_ffn(m: nn.Module) -> bool:
    from moelab.models.transformer import DenseFFN

    if isinstance(m, DenseFFN):
        return True
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def ffn_weights(m: nn.Module) -> DenseWeights:
    """The SwiGLU weights of dense FFN ``m`` (views, not copies)."""
    if not is_dense_ffn(m):
        raise MoelabError(f"module {type(m).__name__} is not a dense SwiGLU FFN (DenseFFN or gate/up/down_proj)")
    if hasattr(m, "w_gate_up"):
        gate_FD, up_FD = m.w_gate_up.weight.chunk(2, dim=0)
        return DenseWeights(gate_FD, up_FD, m.w_down.weight)
    return DenseWeights(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)


def _block_index(parent: nn.Module, order: int) -> int:
    for name in ("layer_index", "layer_idx"):
        if isinstance(getattr(parent, name, None), int):
            return int(getattr(parent, name))
    return order


def dense_ffn_sites(model: nn.Module) -> list[DenseSite]:
    """Every dense FFN block of ``model`` in depth order (see the module docstring)."""
    sites = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if is_dense_ffn(child):
                sites.append(DenseSite(_block_index(parent, len(sites)), child, parent, attr))
    return sorted(sites, key=lambda s: s.index)


def get_dense_site(model: nn.Module, index: int) -> DenseSite:
    sites = dense_ffn_sites(model)
    for s in sites:
        if s.index == index:
            return s
    raise MoelabError(f"layer={index} is not a dense FFN block; dense blocks: {[s.index for s in sites]}")


def replace_dense_ffn(model: nn.Module, index: int, new: nn.Module) -> nn.Module:
    """Put ``new`` where dense block ``index``'s FFN is; returns the old FFN."""
    from moelab.layers.moe import MoELayer

    site = get_dense_site(model, index)
    setattr(site.parent, site.attr, new)
    if hasattr(site.parent, "is_moe"):
        site.parent.is_moe = isinstance(new, MoELayer)
    if isinstance(new, MoELayer):
        new.layer_index = index
    return site.module
